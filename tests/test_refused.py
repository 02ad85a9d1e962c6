"""Refused deliveries: each 4xx before the claim is a row and a log line; the cap holds."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest
from sqlalchemy.engine import make_url

from idemhook.testing import signed
from tests.conftest import SOURCES

VALID = {"id": "evt_ok", "type": "contact.updated"}
SECRET_HEADERS = {
    "Authorization": "Bearer hunter2",
    "Cookie": "session=hunter2",
    "X-Api-Key": "hunter2",
}


@pytest.fixture(autouse=True)
def no_earlier_refusals(sql):
    """Refusals other tests' servers recorded (tests that start gunicorn on the shared
    database empty no table) are not this test's."""
    sql("DELETE FROM rejected_deliveries")


def rows(sql, source="acme"):
    return sql(
        "SELECT error, status_code, tenant, client_addr, user_agent, body_bytes, body_sha256, "
        "headers, count, slot FROM rejected_deliveries WHERE source = :source ORDER BY id",
        source=source,
    )


def forged(client, body: bytes = b'{"id": "e1", "type": "contact.updated"}', **headers):
    return client.post(
        "/webhooks/acme",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Signature": "sha256=" + "0" * 64,
            "User-Agent": "forger/1.0",
            **SECRET_HEADERS,
            **headers,
        },
    )


def test_a_forged_delivery_is_a_row_without_its_body_or_secret_headers(client, sql, caplog):
    body = b'{"id": "e1", "type": "contact.updated", "card": "4242"}'
    with caplog.at_level(logging.WARNING, logger="idemhook.refused"):
        response = forged(client, body)
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_signature"
    [row] = rows(sql)
    error, status, tenant, addr, agent, size, digest, headers, count, slot = row
    assert (error, status, tenant, addr, agent) == (
        "invalid_signature", 401, None, "127.0.0.1", "forger/1.0",
    )  # fmt: skip
    assert (size, digest, count, slot) == (len(body), hashlib.sha256(body).hexdigest(), 1, 1)
    lowered = {name.lower() for name in headers}
    assert "user-agent" in lowered and "content-type" in lowered
    for secret in ("x-signature", "authorization", "cookie", "x-api-key"):
        assert secret not in lowered
    stored = json.dumps(sql("SELECT row_to_json(r) FROM rejected_deliveries r")[0][0])
    assert "4242" not in stored and "hunter2" not in stored and "0" * 64 not in stored
    [line] = [r for r in caplog.records if r.name == "idemhook.refused"]
    assert line.levelno == logging.WARNING
    assert "source=acme" in line.getMessage()
    assert "code=invalid_signature" in line.getMessage()
    assert "client=127.0.0.1" in line.getMessage()


def test_a_configured_signature_header_is_left_out_whatever_its_name(make_app, sql):
    config = json.loads(json.dumps(SOURCES))
    config["sources"]["acme"]["signature_header"] = "X-Webhook-Digest"
    client = make_app(config).test_client()
    response = forged(client, **{"X-Webhook-Digest": "sha256=" + "1" * 64})
    assert response.status_code == 401
    [row] = rows(sql)
    assert "x-webhook-digest" not in {name.lower() for name in row[7]}


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"x" * (1024 * 1024 + 1), {}, 413, "payload_too_large"),
        (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ],
)
def test_a_refusal_before_the_body_is_read_is_recorded(client, sql, body, headers, status, code):
    response = forged(client, body, **headers)
    assert response.status_code == status
    [row] = rows(sql)
    assert row[:2] == (code, status)
    assert row[5] is None and row[6] is None  # the body was never read


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"not json", "invalid_json"), (b'{"type": "contact.updated"}', "missing_event_id")],
)
def test_a_signed_delivery_refused_by_parsing_is_recorded(client, sql, body, code):
    _, body, headers = signed(client.application, "acme", body)
    response = client.post("/webhooks/acme", data=body, headers=headers)
    assert response.status_code == 400
    assert [row[:2] for row in rows(sql)] == [(code, 400)]


def test_an_unknown_source_is_not_recorded(client, sql):
    response = client.post("/webhooks/invented", data=b"{}", headers={"X-Signature": "x"})
    assert response.status_code == 404
    assert sql("SELECT count(*) FROM rejected_deliveries")[0][0] == 0


def test_a_valid_delivery_leaves_no_row(client, sql):
    _, body, headers = signed(client.application, "acme", VALID)
    assert client.post("/webhooks/acme", data=body, headers=headers).status_code == 200
    assert sql("SELECT count(*) FROM rejected_deliveries")[0][0] == 0


def test_past_the_cap_a_minute_s_refusals_are_counted_in_its_last_row(make_app, sql):
    client = make_app(IDEMHOOK_REJECTIONS_PER_MINUTE=3).test_client()
    for _ in range(10):
        assert forged(client).status_code == 401
    per_minute = sql(
        "SELECT minute, count(*), sum(count), max(slot) FROM rejected_deliveries "
        "WHERE source = 'acme' GROUP BY minute"
    )
    assert sum(total for _, _, total, _ in per_minute) == 10
    for _minute, count, _total, top in per_minute:
        assert count <= 4 and top <= 4
    if len(per_minute) == 1:  # the ten did not straddle a minute
        assert sql("SELECT slot, count FROM rejected_deliveries ORDER BY slot") == [
            (1, 1), (2, 1), (3, 1), (4, 7),
        ]  # fmt: skip


def test_the_refusal_is_answered_when_the_database_is_down(make_app, db_url, caplog):
    down = make_url(db_url).set(host="127.0.0.1", port=1)
    app = make_app(DATABASE_URL=down)
    with caplog.at_level(logging.WARNING, logger="idemhook.refused"):
        response = forged(app.test_client())
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_signature"
    [line] = [r for r in caplog.records if r.name == "idemhook.refused"]
    assert "recorded=" in line.getMessage() and "code=invalid_signature" in line.getMessage()


def test_hubspot_behind_a_wrong_public_url_says_which_url_it_verified(make_app, sql):
    config = {"sources": {"hubspot": {"scheme": "hubspot", "secret": "hubspot-secret-1234"}}}
    sender = make_app(config)  # signs the URL it posts to: http://localhost/webhooks/hubspot
    receiver = make_app(config, IDEMHOOK_PUBLIC_URL="https://wrong.example.com/hooks")
    events = [{"portalId": 1, "subscriptionId": 2, "eventId": 3, "occurredAt": 4,
               "subscriptionType": "contact.creation"}]  # fmt: skip
    _, body, headers = signed(sender, "hubspot", events)
    response = receiver.test_client().post("/webhooks/hubspot", data=body, headers=headers)
    assert response.status_code == 401
    message = response.get_json()["message"]
    assert "the URL verified was https://wrong.example.com/hooks/webhooks/hubspot" in message
    assert sql("SELECT source, error, message FROM rejected_deliveries") == [
        ("hubspot", "invalid_signature", message)
    ]


def test_prune_deletes_old_refusals_and_keeps_recent_ones(client, runner, sql):
    for _ in range(3):
        forged(client)
    sql("UPDATE rejected_deliveries SET received_at = now() - interval '40 days' WHERE slot < 3")
    dry = runner.invoke(args=["events", "prune", "--older-than", "30d", "--dry-run"])
    assert dry.exit_code == 0 and "; 2 refused deliveries" in dry.output
    assert sql("SELECT count(*) FROM rejected_deliveries")[0][0] == 3
    done = runner.invoke(args=["events", "prune", "--older-than", "30d", "--batch-size", "1"])
    assert done.exit_code == 0 and "; 2 refused deliveries" in done.output, done.output
    assert sql("SELECT slot FROM rejected_deliveries") == [(3,)]


def test_rejections_list_and_the_read_api_show_the_rows(make_app, sql):
    app = make_app(IDEMHOOK_ADMIN_TOKEN="an-admin-token-of-16+")
    client, runner = app.test_client(), app.test_cli_runner()
    forged(client)
    forged(client, b"hello", **{"Content-Type": "text/plain"})
    listed = runner.invoke(args=["rejections", "list"])
    assert listed.exit_code == 0, listed.output
    assert "invalid_signature" in listed.output and "unsupported_media_type" in listed.output
    assert "acme: 1 invalid_signature, 1 unsupported_media_type since" in listed.output
    as_json = runner.invoke(args=["rejections", "list", "--json", "--source", "acme"])
    lines = [json.loads(line) for line in as_json.output.splitlines()]
    assert [line["error"] for line in lines] == ["unsupported_media_type", "invalid_signature"]
    assert "hunter2" not in as_json.output
    other = runner.invoke(args=["rejections", "list", "--source", "batched", "--since", "1h"])
    assert other.exit_code == 0 and "no refused deliveries since" in other.output

    auth = {"Authorization": "Bearer an-admin-token-of-16+"}
    assert client.get("/rejections").status_code == 401
    page = client.get("/rejections?source=acme&code=invalid_signature", headers=auth)
    assert page.status_code == 200
    [row] = page.get_json()["rejections"]
    assert row["error"] == "invalid_signature" and row["count"] == 1
    assert row["received_at"].endswith("Z") and "minute" not in row
    first = client.get("/rejections?limit=1", headers=auth).get_json()
    assert len(first["rejections"]) == 1 and first["next"]
    rest = client.get(f"/rejections?limit=1&cursor={first['next']}", headers=auth).get_json()
    assert rest["rejections"][0]["id"] != first["rejections"][0]["id"]
    assert client.get("/rejections?nope=1", headers=auth).status_code == 400


OTHER_SCHEMES = {
    "sources": {
        "standard": {
            "scheme": "standard-webhooks",
            "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        },
        "pipedrive": {"scheme": "pipedrive", "username": "idemhook", "secret": "pd-password-1234"},
    }
}


def test_a_stale_timestamp_is_recorded_with_its_code(make_app, sql, monkeypatch):
    app = make_app(OTHER_SCHEMES)
    with monkeypatch.context() as patched:  # signed an hour ago: a replay
        patched.setattr(time, "time", lambda: 1_800_000_000.0 - 3600)
        _, body, headers = signed(app, "standard", {"type": "invoice.paid"})
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    response = app.test_client().post("/webhooks/standard", data=body, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"] == "stale_timestamp"
    [row] = sql("SELECT source, error, headers FROM rejected_deliveries")
    assert row[:2] == ("standard", "stale_timestamp")
    assert "webhook-signature" not in {name.lower() for name in row[2]}
    assert "webhook-timestamp" in {name.lower() for name in row[2]}


def test_missing_and_wrong_credentials_are_recorded_without_them(make_app, sql):
    client = make_app(OTHER_SCHEMES).test_client()
    body = b'{"meta": {"id": "1", "entity": "deal", "action": "change"}}'
    json_type = {"Content-Type": "application/json"}
    assert client.post("/webhooks/pipedrive", data=body, headers=json_type).status_code == 401
    wrong = {**json_type, "Authorization": "Basic aWRlbWhvb2s6aHVudGVyMg=="}
    assert client.post("/webhooks/pipedrive", data=body, headers=wrong).status_code == 401
    no_signature = client.post("/webhooks/standard", data=b"{}", headers=json_type)
    assert no_signature.get_json()["error"] == "missing_signature"
    rows = sql("SELECT source, error, headers::text FROM rejected_deliveries ORDER BY id")
    assert [row[:2] for row in rows] == [
        ("pipedrive", "missing_credentials"),
        ("pipedrive", "invalid_credentials"),
        ("standard", "missing_signature"),
    ]
    assert all("aWRlbWhvb2s6aHVudGVyMg" not in row[2] for row in rows)
    assert all("authorization" not in row[2].lower() for row in rows)


def test_refusals_are_counted_in_the_metrics(client):
    for _ in range(3):
        forged(client)
    forged(client, b"hi", **{"Content-Type": "text/plain"})
    client.post("/webhooks/invented", data=b"{}")
    metrics = client.get("/metrics").get_data(as_text=True)
    counted = 'idemhook_rejected_deliveries_total{code="%s",source="acme"} %s'
    assert counted % ("invalid_signature", "3.0") in metrics
    assert counted % ("unsupported_media_type", "1.0") in metrics
    assert 'source="invented"' not in metrics
