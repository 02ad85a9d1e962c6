"""Freshness: a late or out-of-order update never overwrites newer data.

A source with ``[sources.<name>.freshness]`` reads each event's object and version; an
event that is not newer than the version already applied to its object is claimed
``stale`` and runs no handler (docs/configuration.md#freshness). The handlers are
``tests.plugins.versioned``: a naive CRM that overwrites its row with whatever it is
sent, which is exactly what freshness protects.

Runs on PostgreSQL and on SQLite (the demo) unless a test says otherwise.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from idemhook._config.freshness import normalize
from idemhook._config.sources import parse_source
from idemhook._engine.applier import apply_due
from idemhook._values.errors import BadRequest, ConfigError
from idemhook.testing import deliver
from tests.conftest import SECRET

FRESHNESS = {"object": "body:object", "version": "body:version"}
SIGNED = {
    "scheme": "hmac-sha256",
    "secret": SECRET,
    "event_id": "body:id",
    "event_type": "body:type",
}
FRESH_SOURCES = {
    "plugins": ["tests.plugins.versioned"],
    "sources": {
        "versioned": {**SIGNED, "freshness": FRESHNESS},
        "versioned_batch": {**SIGNED, "batch": "array", "freshness": FRESHNESS},
        "audited": {**SIGNED, "freshness": FRESHNESS},
        "versioned_async": {**SIGNED, "mode": "async", "freshness": FRESHNESS},
    },
}


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, pg_url, sqlite_url):
    """Both supported backends."""
    return pg_url if request.param == "postgresql" else sqlite_url


@pytest.fixture
def app(make_app):
    """The receiver with the freshness test sources."""
    return make_app(FRESH_SOURCES)


def event(event_id: str, version, obj: str = "c1", **extra) -> dict:
    return {
        "id": event_id,
        "type": "contact.updated",
        "object": obj,
        "version": version,
        "data": f"data of {event_id}",
        **extra,
    }


def data_of(sql, obj: str = "c1", source: str = "versioned"):
    rows = sql(
        "SELECT event_id, data FROM test_objects WHERE source = :s AND object_key = :o",
        s=source,
        o=obj,
    )
    return rows[0] if rows else None


def applied(sql, source: str = "versioned") -> list[str]:
    """The events whose handler ran, in the order their runs committed."""
    rows = sql("SELECT event_id FROM test_object_log WHERE source = :s ORDER BY n", s=source)
    return [r[0] for r in rows]


def claim_of(sql, event_id: str, source: str = "versioned"):
    rows = sql(
        "SELECT status, result FROM processed_events WHERE source = :s AND event_id = :e",
        s=source,
        e=event_id,
    )
    if not rows:
        return None
    status, result = rows[0]
    return status, json.loads(result) if isinstance(result, str) else result  # SQLite: text


def version_row(sql, obj: str = "c1", source: str = "versioned"):
    rows = sql(
        "SELECT version, event_id FROM object_versions WHERE source = :s AND object_key = :o",
        s=source,
        o=obj,
    )
    return (float(rows[0][0]), rows[0][1]) if rows else None


def test_an_older_event_after_a_newer_one_is_stale_and_runs_nothing(client, sql):
    newer = deliver(client, "versioned", event("e2", 2))
    assert newer.status_code == 200 and newer.json["status"] == "processed"

    older = deliver(client, "versioned", event("e1", 1))
    assert older.status_code == 200
    assert older.json == {
        "event_id": "e1",
        "status": "stale",
        "newer": "e2",
        "result": {"newer": "e2"},
    }
    assert applied(sql) == ["e2"]
    assert data_of(sql) == ("e2", "data of e2")
    assert version_row(sql) == (2.0, "e2")
    assert claim_of(sql, "e1") == ("stale", {"newer": "e2"})

    # Its redelivery is a duplicate of the stale claim: still nothing runs.
    again = deliver(client, "versioned", event("e1", 1))
    assert again.json == {"event_id": "e1", "status": "duplicate", "result": {"newer": "e2"}}
    assert applied(sql) == ["e2"]


def test_a_newer_event_applies_and_moves_the_version(client, sql):
    for event_id, version in (("e1", 1), ("e3", 3), ("e7", 7)):
        answer = deliver(client, "versioned", event(event_id, version))
        assert answer.json["status"] == "processed"
    assert applied(sql) == ["e1", "e3", "e7"]
    assert data_of(sql) == ("e7", "data of e7")
    assert version_row(sql) == (7.0, "e7")
    # Another object is another row: its first event applies whatever its version.
    assert deliver(client, "versioned", event("o2", 1, obj="c2")).json["status"] == "processed"
    assert version_row(sql, "c2") == (1.0, "o2")


def test_the_same_version_under_another_event_id_is_stale(client, sql):
    assert deliver(client, "versioned", event("first", 5)).json["status"] == "processed"
    same = deliver(client, "versioned", event("second", 5))
    assert same.json["status"] == "stale" and same.json["newer"] == "first"
    assert applied(sql) == ["first"]
    assert version_row(sql) == (5.0, "first")


def test_a_batch_with_two_events_of_one_object_out_of_order_applies_them_in_version_order(
    client, sql
):
    batch = [event("b-new", 20), event("other", 1, obj="c9"), event("b-old", 10)]
    answer = deliver(client, "versioned_batch", batch)
    assert answer.status_code == 200
    # The answer keeps the delivery's order; both of c1's events applied, oldest first.
    assert [(e["event_id"], e["status"]) for e in answer.json["events"]] == [
        ("b-new", "processed"),
        ("other", "processed"),
        ("b-old", "processed"),
    ]
    order = [e for e in applied(sql, "versioned_batch") if e.startswith("b-")]
    assert order == ["b-old", "b-new"]
    assert data_of(sql, source="versioned_batch") == ("b-new", "data of b-new")
    assert version_row(sql, source="versioned_batch") == (20.0, "b-new")

    # A batch older than what its object holds is stale throughout.
    late = deliver(client, "versioned_batch", [event("late-2", 15), event("late-1", 12)])
    assert [(e["event_id"], e["status"], e["newer"]) for e in late.json["events"]] == [
        ("late-2", "stale", "b-new"),
        ("late-1", "stale", "b-new"),
    ]
    assert data_of(sql, source="versioned_batch") == ("b-new", "data of b-new")


def test_the_older_event_of_a_batch_is_stale_only_when_the_newer_one_was_applied(client, sql):
    # The newer event's handler fails: it is rolled back, so the older one is not stale.
    batch = [event("n2", 2, fail=True), event("n1", 1)]
    answer = deliver(client, "versioned_batch", batch)
    assert answer.status_code == 500
    assert [(e["event_id"], e["status"]) for e in answer.json["events"]] == [
        ("n2", "failed"),
        ("n1", "processed"),
    ]
    assert version_row(sql, source="versioned_batch") == (1.0, "n1")
    assert data_of(sql, source="versioned_batch") == ("n1", "data of n1")
    # The provider's retry, the CRM mended: the newer one applies over it.
    retry = deliver(client, "versioned_batch", [event("n2", 2), event("n1", 1)])
    assert [(e["event_id"], e["status"]) for e in retry.json["events"]] == [
        ("n2", "processed"),
        ("n1", "duplicate"),
    ]
    assert data_of(sql, source="versioned_batch") == ("n2", "data of n2")


def test_a_stale_event_runs_only_the_handlers_registered_with_stale_true(client, sql):
    fresh = deliver(client, "audited", event("a2", 2))
    assert fresh.json["status"] == "processed"
    # Every handler ran for the fresh event; the audit one saw event.stale False.
    assert applied(sql, "audited") == ["a2"]
    assert fresh.json["result"]["tests.plugins.versioned:audit"] == {
        "audited": "a2",
        "stale": False,
    }

    stale = deliver(client, "audited", event("a1", 1))
    assert stale.status_code == 200
    assert stale.json == {
        "event_id": "a1",
        "status": "stale",
        "newer": "a2",
        "result": {"newer": "a2", "handlers": {"audited": "a1", "stale": True}},
    }
    assert applied(sql, "audited") == ["a2"]  # the naive sync never saw it
    assert data_of(sql, source="audited") == ("a2", "data of a2")
    rows = sql("SELECT event_id, stale FROM test_audit ORDER BY n")
    assert [(e, bool(s)) for e, s in rows] == [("a2", False), ("a1", True)]


def test_a_failing_stale_handler_fails_the_event_and_its_retry_runs_it_again(client, sql):
    assert deliver(client, "audited", event("f2", 2)).json["status"] == "processed"
    failed = deliver(client, "audited", event("f1", 1, audit_fail=True))
    assert failed.status_code == 500
    assert claim_of(sql, "f1", "audited") is None  # nothing recorded: the retry runs it
    assert sql("SELECT count(*) FROM delivery_failures WHERE event_id = 'f1'")[0][0] == 1
    retried = deliver(client, "audited", event("f1", 1))
    assert retried.json["status"] == "stale"
    assert sql("SELECT count(*) FROM test_audit WHERE event_id = 'f1'")[0][0] == 1
    assert version_row(sql, source="audited") == (2.0, "f2")


def test_replay_of_a_stale_event_says_so_and_force_applies_it_and_moves_the_version(
    client, runner, sql
):
    deliver(client, "versioned", event("r2", 2))
    deliver(client, "versioned", event("r1", 1))
    assert claim_of(sql, "r1")[0] == "stale"

    refused = runner.invoke(args=["events", "replay", "versioned", "r1"])
    assert refused.exit_code == 2
    assert "event 'r1' is stale" in refused.output and "'r2'" in refused.output
    assert "--force" in refused.output
    assert applied(sql) == ["r2"]

    forced = runner.invoke(args=["events", "replay", "versioned", "r1", "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    [row] = [json.loads(line) for line in forced.output.splitlines()]
    assert row["status"] == "processed" and row["replay_count"] == 1
    assert applied(sql) == ["r2", "r1"]
    assert data_of(sql) == ("r1", "data of r1")
    assert version_row(sql) == (1.0, "r1")
    # r2 is newer than what c1 holds now: replaying it is a plain replay again.
    said = runner.invoke(args=["events", "replay", "versioned", "r2"])
    assert said.exit_code == 2 and "stale" not in said.output
    # And a new event at r2's version applies: it is newer than r1's.
    assert deliver(client, "versioned", event("r3", 2)).json["status"] == "processed"


def test_replay_of_the_newest_event_is_a_plain_replay(client, runner, sql):
    deliver(client, "versioned", event("p1", 1))
    refused = runner.invoke(args=["events", "replay", "versioned", "p1"])
    assert refused.exit_code == 2 and "stale" not in refused.output
    done = runner.invoke(args=["events", "replay", "versioned", "p1", "--force"])
    assert done.exit_code == 0, done.output
    assert applied(sql) == ["p1", "p1"]
    assert version_row(sql) == (1.0, "p1")


@pytest.mark.parametrize(
    ("body", "code", "locator"),
    [
        ({"id": "x", "type": "t", "version": 1}, "missing_freshness_field", "body:object"),
        ({"id": "x", "type": "t", "object": "c1"}, "missing_freshness_field", "body:version"),
        ({"id": "x", "type": "t", "object": "c1", "version": None}, "missing_freshness_field",
         "body:version"),
        ({"id": "x", "type": "t", "object": "c1", "version": "yesterday"}, "invalid_version",
         None),
        ({"id": "x", "type": "t", "object": "c1", "version": True}, "invalid_version", None),
        ({"id": "x", "type": "t", "object": "c1", "version": "2026-01-02T03:04:05"},
         "invalid_version", None),
        ({"id": "x", "type": "t", "object": "c1", "version": {"v": 1}}, "invalid_version", None),
        ({"id": "x", "type": "t", "object": "c1", "version": "1" * 41}, "invalid_version", None),
        ({"id": "x", "type": "t", "object": ["c1"], "version": 1}, "invalid_object_key", None),
        ({"id": "x", "type": "t", "object": "", "version": 1}, "invalid_object_key", None),
    ],
)
def test_an_event_without_a_usable_object_or_version_is_refused_and_stores_nothing(
    client, sql, body, code, locator
):
    answer = deliver(client, "versioned", body)
    assert answer.status_code == 400
    assert answer.json["error"] == code
    if locator is not None:
        assert answer.json["locator"] == locator and locator in answer.json["message"]
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert applied(sql) == []


def test_one_bad_event_refuses_the_whole_batch(client, sql):
    batch = [event("ok", 1), {"id": "bad", "type": "t", "object": "c1"}]
    answer = deliver(client, "versioned_batch", batch)
    assert answer.status_code == 400 and answer.json["error"] == "missing_freshness_field"
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0


def test_rfc3339_versions_compare_as_instants_whatever_their_offset(client, sql):
    # 10:00 at +02:00 is 08:00 UTC: older than 09:00 UTC, though it reads later.
    first = deliver(client, "versioned", event("t1", "2026-01-01T09:00:00Z"))
    assert first.json["status"] == "processed"
    second = deliver(client, "versioned", event("t2", "2026-01-01T10:00:00+02:00"))
    assert second.json["status"] == "stale"
    # A fraction of a second later is newer.
    third = deliver(client, "versioned", event("t3", "2026-01-01T09:00:00.5Z"))
    assert third.json["status"] == "processed"
    assert version_row(sql)[1] == "t3"


def test_failures_retry_of_an_event_whose_object_moved_on_claims_it_stale(client, runner, sql):
    assert deliver(client, "versioned", event("fr1", 1, fail=True)).status_code == 500
    assert deliver(client, "versioned", event("fr2", 2)).json["status"] == "processed"
    retried = runner.invoke(args=["failures", "retry", "versioned", "fr1"])
    assert retried.exit_code == 0, retried.output
    assert claim_of(sql, "fr1") == ("stale", {"newer": "fr2"})
    assert data_of(sql) == ("fr2", "data of fr2")


def test_an_asynchronous_source_checks_when_the_worker_applies(app, client, sql):
    # Received newest first: the worker applies them in the order received, so the older
    # one meets the newer one's version and is stale.
    for e in (event("q2", 2), event("q1", 1), event("q3", 3, obj="c2")):
        assert deliver(client, "versioned_async", e).status_code == 202
    assert apply_due(app) == 3
    assert claim_of(sql, "q1", "versioned_async") == ("stale", {"newer": "q2"})
    assert claim_of(sql, "q2", "versioned_async")[0] == "processed"
    assert applied(sql, "versioned_async") == ["q2", "q3"]
    assert data_of(sql, source="versioned_async") == ("q2", "data of q2")
    # A duplicate of the stale event is answered with its stored result.
    again = deliver(client, "versioned_async", event("q1", 1))
    assert again.status_code == 200 and again.json["status"] == "duplicate"
    assert again.json["result"] == {"newer": "q2"}


def test_an_asynchronous_failed_attempt_leaves_the_version_where_it_was(app, client, sql):
    deliver(client, "versioned_async", event("w1", 1))
    deliver(client, "versioned_async", event("w2", 2, fail=True))
    apply_due(app)
    assert version_row(sql, source="versioned_async") == (1.0, "w1")
    assert claim_of(sql, "w2", "versioned_async")[0] == "received"  # due again later


def test_the_stale_status_is_counted_listed_and_in_the_metrics(client, runner, sql):
    deliver(client, "versioned", event("m2", 2))
    deliver(client, "versioned", event("m1", 1))
    listed = runner.invoke(args=["events", "list", "--status", "stale", "--json"])
    assert [json.loads(line)["event_id"] for line in listed.output.splitlines()] == ["m1"]
    stats = runner.invoke(args=["events", "stats", "--by", "source", "--json"])
    [group] = [json.loads(line) for line in stats.output.splitlines()]
    assert group["by_status"] == {"processed": 1, "stale": 1}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert (
        'idemhook_events_total{outcome="stale",source="versioned",type="contact.updated"} 1.0'
        in metrics
    )


def test_objects_show_prints_the_applied_version_and_its_event(client, runner, sql):
    deliver(client, "versioned", event("s5", 5))
    deliver(client, "versioned", event("s4", 4))
    shown = runner.invoke(args=["objects", "show", "versioned", "c1"])
    assert shown.exit_code == 0, shown.output
    lines = dict(line.split(None, 1) for line in shown.output.splitlines())
    assert lines["version"] == "5" and lines["event_id"] == "s5" and lines["status"] == "processed"
    as_json = runner.invoke(args=["objects", "show", "versioned", "c1", "--json"])
    found = json.loads(as_json.output)
    assert found["version"] == "5" and found["event_id"] == "s5" and found["floor"] is None
    missing = runner.invoke(args=["objects", "show", "versioned", "nobody"])
    assert missing.exit_code == 1 and "no version is recorded" in missing.output


def test_pruning_object_versions_never_lets_an_old_event_apply(client, runner, sql, db_url):
    deliver(client, "versioned", event("old-9", 9, obj="idle"))
    deliver(client, "versioned", event("new-3", 3, obj="busy"))
    # The idle object's last event was applied 100 days ago.
    sql(
        "UPDATE object_versions SET applied_at = :at WHERE object_key = 'idle'",
        at=datetime.now(UTC) - timedelta(days=100),
    )
    dry = runner.invoke(args=["objects", "prune", "--older-than", "90d", "--dry-run"])
    assert dry.exit_code == 0 and "would prune 1 objects" in dry.output
    pruned = runner.invoke(args=["objects", "prune", "--older-than", "90d"])
    assert pruned.exit_code == 0, pruned.output
    assert "pruned 1 objects" in pruned.output and "versioned: 9" in pruned.output
    assert version_row(sql, "idle") is None and version_row(sql, "busy") == (3.0, "new-3")

    # A late event of the pruned object, older than what was pruned: still stale.
    late = deliver(client, "versioned", event("late-5", 5, obj="idle"))
    assert late.json["status"] == "stale" and late.json["newer"] == "old-9"
    # So is any event at or below the floor, whatever its object (the trade-off).
    assert deliver(client, "versioned", event("new-obj", 9, obj="fresh")).json["status"] == "stale"
    # Above it, events apply as before.
    assert deliver(client, "versioned", event("idle-10", 10, obj="idle")).json["status"] == (
        "processed"
    )
    shown = runner.invoke(args=["objects", "show", "versioned", "idle", "--json"])
    assert json.loads(shown.output)["floor"]["version"] == "9"


# -- the version and the configuration, unit by unit -------------------------------------------


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (1764300000123, Decimal("1764300000123")),
        (-3, Decimal(-3)),
        (17.5, Decimal("17.5")),
        ("42", Decimal(42)),
        ("1e3", Decimal(1000)),
        ("1970-01-01T00:00:00Z", Decimal(0)),
        ("1970-01-01T01:00:00+01:00", Decimal(0)),
        ("2026-01-02T03:04:05.678+01:00", Decimal("1767319445.678")),
        ("2026-01-02t02:04:05.123456789z", Decimal("1767319445.123456789")),
        ("2026-01-02 02:04:05Z", Decimal(1767319445)),
        ("2016-12-31T23:59:60Z", Decimal(1483228800)),  # a leap second: the next minute
    ],
)
def test_versions_normalise_to_comparable_numbers(value, number):
    assert normalize(value) == number


@pytest.mark.parametrize(
    "value",
    ["2026-01-02", "2026-01-02T03:04:05", "2026-02-30T00:00:00Z", "2026-01-02T03:04:61Z",
     "2026-01-02T03:04:05+24:00", "01", "1.", "NaN", "", [1], False, 10**41],
)
def test_what_is_not_a_version_is_invalid_version(value):
    with pytest.raises(BadRequest) as raised:
        normalize(value)
    assert raised.value.code == "invalid_version"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"object": "body:id"}, "version: missing"),
        ({"version": "body:v"}, "object: missing"),
        ({"object": "body:id", "version": "body:v", "order": 1}, "unknown key(s) order"),
        ({"object": "sha256:body", "version": "body:v"}, "names no object"),
        ({"object": "body:id", "version": ["body:a", "body:b"]}, "version: one locator"),
        ({"object": "id", "version": "body:v"}, "[sources.s.freshness] object"),
        ("body:id", "a table with object and version"),
    ],
)
def test_a_wrong_freshness_table_stops_start_up_naming_the_key(table, message):
    with pytest.raises(ConfigError) as raised:
        parse_source("s", {**SIGNED, "freshness": table}, default_max_body=1000)
    assert message in str(raised.value)


def test_freshness_takes_a_list_of_locators_for_the_object(client, sql):
    source = parse_source(
        "s",
        {**SIGNED, "freshness": {"object": ["body:portal", "body:object"], "version": "body:v"}},
        default_max_body=1000,
    )
    assert str(source.freshness.object) == "[body:portal, body:object]"


def test_an_api_source_cannot_have_freshness():
    table = {"scheme": "idempotency-key", "secret": SECRET, "path": "/v1/things"}
    with pytest.raises(ConfigError, match="freshness is for providers"):
        parse_source("api", {**table, "freshness": FRESHNESS}, default_max_body=1000)


def test_the_read_api_lists_stale_events_and_shows_an_object(make_app):
    token = "freshness-admin-token-0123"
    app = make_app(FRESH_SOURCES, IDEMHOOK_ADMIN_TOKEN=token)
    client = app.test_client()
    deliver(client, "versioned", event("api2", "2026-01-02T03:04:05.25Z"))
    deliver(client, "versioned", event("api1", "2026-01-02T03:04:05Z"))
    auth = {"Authorization": f"Bearer {token}"}
    listed = client.get("/events?status=stale", headers=auth)
    assert [e["event_id"] for e in listed.json["events"]] == ["api1"]
    assert listed.json["events"][0]["result"] == {"newer": "api2"}
    shown = client.get("/objects/versioned/c1", headers=auth)
    assert shown.status_code == 200
    assert shown.json == {
        "source": "versioned",
        "object_key": "c1",
        "version": "1767323045.25",
        "event_id": "api2",
        "applied_at": shown.json["applied_at"],
        "event_status": "processed",
        "floor": None,
    }
    missing = client.get("/objects/versioned/nobody", headers=auth)
    assert missing.status_code == 404 and missing.json["error"] == "object_not_found"
    assert client.get("/objects/versioned/c1").status_code == 401


def test_sources_and_handlers_list_say_what_freshness_does(runner):
    sources = runner.invoke(args=["sources"])
    assert (
        "freshness  object at body:object, version at body:version: an event older than its "
        "object's applied version is stale" in sources.output
    )
    handlers = runner.invoke(args=["handlers", "list"])
    line = next(x for x in handlers.output.splitlines() if "versioned:audit" in x)
    assert line.split() == [
        "audited", "*", "tests.plugins.versioned:audit", "(stale=True:", "sees", "stale",
        "events", "too)",
    ]


def test_an_event_accepted_before_freshness_was_set_fails_its_attempt_naming_the_field(
    make_app, sql
):
    # Accepted while the asynchronous source had no freshness; applied after it was set.
    before = {**FRESH_SOURCES, "sources": {**FRESH_SOURCES["sources"]}}
    before["sources"]["versioned_async"] = {**SIGNED, "mode": "async"}
    deliver(make_app(before).test_client(), "versioned_async", {"id": "u1", "type": "t"})
    applied_by = make_app(FRESH_SOURCES)
    assert apply_due(applied_by) == 1
    assert claim_of(sql, "u1", "versioned_async")[0] == "received"  # due again after a backoff
    [error] = sql("SELECT error FROM delivery_failures WHERE event_id = 'u1'")[0]
    assert "idemhook freshness raised BadRequest" in error and "body:object" in error
    assert applied(sql, "versioned_async") == []
