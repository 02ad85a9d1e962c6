"""The read API on PostgreSQL: auth, filters, keyset pages, stats, failures."""

from __future__ import annotations

import json

import pytest

from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from tests.test_events_cli import UTC, datetime, seed, timedelta

TOKEN = "s3cret-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = ("/events", "/events/stats", "/failures", "/events/acme/evt_1")


@pytest.fixture
def app(make_app):
    """The receiver with the read API enabled."""
    return make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN)


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    "header",
    [
        None,
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer ",
    ],
)
def test_every_route_refuses_without_the_token(client, path, header):
    deliver(client, "acme", {"id": "evt_1", "type": "contact.updated"})
    headers = {"Authorization": header} if header is not None else {}
    response = client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "evt_1" not in response.get_data(as_text=True)


def test_existence_of_an_event_does_not_leak_without_the_token(client):
    deliver(client, "acme", {"id": "evt_1", "type": "contact.updated"})
    present = client.get("/events/acme/evt_1")
    absent = client.get("/events/acme/never")
    assert (present.status_code, present.json) == (absent.status_code, absent.json)


def test_api_is_off_without_a_configured_token(make_app):
    client = make_app().test_client()
    for path in ROUTES:
        response = client.get(path, headers=AUTH)
        assert response.status_code == 404, path
        assert response.json["error"] == "not_found"


def test_short_admin_token_is_refused_at_start(make_app):
    with pytest.raises(ConfigError, match="IDEMHOOK_ADMIN_TOKEN"):
        make_app(IDEMHOOK_ADMIN_TOKEN="short")


def test_list_filters_match_the_cli(client, runner, sql):
    seed(sql, "acme", "a1", ago=timedelta(hours=5))
    seed(sql, "acme", "a2", ago=timedelta(minutes=50), type="invoice.paid", status="ignored")
    seed(sql, "open", "o1", ago=timedelta(minutes=5), type=None)

    def ids(**params):
        response = client.get("/events", query_string=params, headers=AUTH)
        assert response.status_code == 200, response.json
        return [e["event_id"] for e in response.json["events"]]

    assert ids() == ["o1", "a2", "a1"]
    assert ids(source="acme") == ["a2", "a1"]
    assert ids(type="invoice.paid") == ["a2"]
    assert ids(status="processed") == ["o1", "a1"]
    assert ids(since="1h") == ["o1", "a2"]
    assert ids(until=(datetime.now(UTC) - timedelta(hours=1)).isoformat()) == ["a1"]
    cli = runner.invoke(args=["events", "list", "--json", "--since", "1h", "--source", "acme"])
    api = client.get("/events?since=1h&source=acme", headers=AUTH).json["events"]
    assert [json.loads(line) for line in cli.output.splitlines()] == api


def test_keyset_pagination_walks_every_row_once_across_pages(client, sql):
    # Ties on received_at are broken by id, so no row is skipped or repeated.
    for i in range(7):
        seed(sql, "acme", f"e{i}", ago=timedelta(minutes=i // 2))
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, "source": "acme"}
        if cursor:
            params["cursor"] = cursor
        body = client.get("/events", query_string=params, headers=AUTH).json
        pages += 1
        seen += [e["event_id"] for e in body["events"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == [f"e{i}" for i in range(7)] and len(seen) == 7
    # A row delivered while paging does not shift the pages already handed out.
    first = client.get("/events?limit=3", headers=AUTH).json
    seed(sql, "acme", "newest", ago=timedelta(0))
    second = client.get(f"/events?limit=3&cursor={first['next']}", headers=AUTH).json
    assert not {e["event_id"] for e in first["events"]} & {e["event_id"] for e in second["events"]}


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "invalid_parameter"),
        ("limit=many", "invalid_parameter"),
        ("limit=100000", "invalid_parameter"),
        ("since=yesterday", "invalid_parameter"),
        ("since=99999999999999d", "invalid_parameter"),
        ("until=999999d", "invalid_parameter"),
        ("until=0001-01-01T00:00%2B01:00", "invalid_parameter"),
        ("cursor=not-a-cursor", "invalid_cursor"),
        # A well-formed cursor naming an impossible row: [time, 2**70].
        (
            "cursor=WyIyMDI2LTExLTAxVDAwOjAwOjAwWiIsMTE4MDU5MTYyMDcxNzQxMTMwMzQyNF0",
            "invalid_cursor",
        ),
        ("souce=acme", "invalid_parameter"),
        ("source=a%00b", "invalid_parameter"),
    ],
)
def test_bad_parameters_are_400_with_a_stable_code(client, query, code):
    response = client.get(f"/events?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.json["error"] == code and response.json["message"]


def test_show_event_with_failures_and_404(client, sql):
    sql("INSERT INTO test_failures VALUES ('evt/slash', 'down')")
    deliver(client, "acme", {"id": "evt/slash", "type": "contact.updated"})
    sql("DELETE FROM test_failures")
    deliver(client, "acme", {"id": "evt/slash", "type": "contact.updated"})
    response = client.get("/events/acme/evt/slash", headers=AUTH)
    assert response.status_code == 200
    event = response.json
    assert event["event_id"] == "evt/slash" and event["status"] == "processed"
    assert event["payload"] == {"id": "evt/slash", "type": "contact.updated"}
    assert event["result"] == {"applied": "evt/slash"}
    assert [f["error"] for f in event["failures"]] == [
        "tests.plugins.recorder:record raised RuntimeError: down"
    ]
    nul = client.get("/events/acme/a%00b", headers=AUTH)
    assert nul.status_code == 400 and nul.json["error"] == "invalid_parameter"
    missing = client.get("/events/acme/nope", headers=AUTH)
    assert missing.status_code == 404 and missing.json["error"] == "event_not_found"


def test_stats_and_failures(client, sql):
    deliver(client, "acme", {"id": "x1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "x1", "type": "contact.updated"})
    sql("INSERT INTO test_failures VALUES ('x2', 'down'), ('x3', 'down')")
    deliver(client, "acme", {"id": "x2", "type": "contact.updated"})
    deliver(client, "acme", {"id": "x3", "type": "contact.deleted"})
    sql("DELETE FROM test_failures WHERE event_id = 'x2'")
    deliver(client, "acme", {"id": "x2", "type": "contact.updated"})

    stats = client.get("/events/stats?since=1h&by=type", headers=AUTH).json
    groups = {g["key"]: g for g in stats["groups"]}
    assert groups["contact.updated"] == {
        "key": "contact.updated",
        "events": 2,
        "by_status": {"processed": 2},
        "duplicates": 1,
        "failures": 1,
    }
    assert groups["contact.deleted"]["failures"] == 1 and groups["contact.deleted"]["events"] == 0
    assert stats["totals"]["failures"] == 2 and stats["by"] == "type"
    bad = client.get("/events/stats?by=colour", headers=AUTH)
    assert bad.status_code == 400 and bad.json["error"] == "invalid_parameter"

    failures = client.get("/failures", headers=AUTH).json
    assert [(f["event_id"], f["resolved"]) for f in failures["failures"]] == [
        ("x3", False),
        ("x2", True),
    ]
    assert failures["next"] is None
    pending = client.get("/failures?pending=true&limit=1", headers=AUTH).json
    assert [f["event_id"] for f in pending["failures"]] == ["x3"] and pending["next"] is None
    # What an operator needs to fix the handler; never the stored body or headers.
    assert "RuntimeError" in failures["failures"][0]["traceback"]
    assert "raw_body" not in failures["failures"][0] and "headers" not in failures["failures"][0]
