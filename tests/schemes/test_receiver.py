"""Provider schemes end to end: signed by the test kit, through the receiver, into PostgreSQL."""

from __future__ import annotations

import json

import pytest

from idemhook._config.schemes import Delivery
from idemhook._config.schemes.salesforce_outbound import envelope
from idemhook.testing import deliver, signed

from .conftest import ORG, PROVIDER_SOURCES

# source -> (payload, extra headers, expected stored event_id, expected event_type)
SINGLE = {
    "stripe": ({"id": "evt_1", "type": "charge.succeeded"}, {}, "evt_1", "charge.succeeded"),
    "standard": (
        {"type": "invoice.paid"},
        {"webhook-id": "msg_1"},
        "msg_1",
        "invoice.paid",
    ),
    "svix": ({"type": "invoice.paid"}, {"svix-id": "msg_2"}, "msg_2", "invoice.paid"),
    "github": (
        {"action": "opened", "number": 1},
        {"X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958", "X-GitHub-Event": "issues"},
        "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "issues",
    ),
    "shopify": (
        {"id": 820982911946154508},
        {"X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37", "X-Shopify-Topic": "orders/create"},
        "b54557e4-bdd9-4b37",
        "orders/create",
    ),
    "close": (
        {"event": {"id": "ev_2sYK", "object_type": "opportunity", "action": "updated"}},
        {},
        "ev_2sYK",
        "opportunity.updated",
    ),
    "pipedrive": (
        {"meta": {"id": "6f4a-1b2c", "entity": "deal", "action": "change"}, "data": {"id": 7}},
        {},
        "6f4a-1b2c",
        "deal.change",
    ),
}
#: Signed and answered like the webhooks, but in API form (docs/idempotency-keys.md).
FIRST_PARTY = ({"amount": 100}, {"Idempotency-Key": "order-77-charge"}, "order-77-charge", None)


def effects(sql, source: str) -> list[str]:
    rows = sql("SELECT event_id FROM test_effects WHERE source = :s ORDER BY 1", s=source)
    return [row.event_id for row in rows]


@pytest.mark.parametrize("source", sorted(SINGLE))
def test_signed_event_is_applied_once_and_redelivery_is_a_duplicate(pclient, sql, source) -> None:
    payload, headers, event_id, event_type = SINGLE[source]
    first = deliver(pclient, source, payload, headers)
    assert first.status_code == 200, first.json
    assert first.json["status"] == "processed"
    again = deliver(pclient, source, payload, headers)  # re-signed, as a provider retry is
    assert again.status_code == 200
    assert again.json["status"] == "duplicate"
    assert effects(sql, source) == [event_id]
    stored = sql("SELECT event_id, event_type FROM processed_events WHERE source = :s", s=source)
    assert [(r.event_id, r.event_type) for r in stored] == [(event_id, event_type)]


def test_first_party_request_is_applied_once_and_its_answer_replayed(pclient, sql) -> None:
    payload, headers, event_id, event_type = FIRST_PARTY
    first = deliver(pclient, "firstparty", payload, headers)
    assert (first.status_code, first.json) == (200, {"applied": event_id})
    again = deliver(pclient, "firstparty", payload, headers)  # re-signed, as a client retries
    assert (again.status_code, again.json) == (200, first.json)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert effects(sql, "firstparty") == [event_id]
    stored = sql("SELECT event_id, event_type FROM processed_events WHERE source = 'firstparty'")
    assert [(r.event_id, r.event_type) for r in stored] == [(event_id, event_type)]


@pytest.mark.parametrize("source", sorted({**SINGLE, "firstparty": FIRST_PARTY}))
def test_tampered_event_is_refused_and_nothing_stored(pclient, sql, source) -> None:
    payload, headers, _, _ = {**SINGLE, "firstparty": FIRST_PARTY}[source]
    url, body, all_headers = signed(pclient.application, source, payload, headers)
    response = pclient.post(url, data=body + b" ", headers=all_headers)
    if source == "pipedrive":  # Basic auth does not cover the body: it is accepted
        assert response.status_code == 200
        return
    assert response.status_code == 401
    assert response.json["error"] == "invalid_signature"
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0


def test_github_ping_is_answered_without_storing(pclient, sql) -> None:
    response = deliver(
        pclient,
        "github",
        {"zen": "Keep it logically awesome.", "hook_id": 1},
        {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "ping-1"},
    )
    assert response.status_code == 200
    assert response.json["status"] == "pong"
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0


def test_unsigned_ping_is_still_refused(pclient) -> None:
    response = pclient.post(
        "/webhooks/github",
        json={"zen": "x"},
        headers={"X-GitHub-Event": "ping", "X-GitHub-Delivery": "ping-2"},
    )
    assert response.status_code == 401
    assert response.json["error"] == "missing_signature"


def test_pipedrive_without_credentials_gets_a_basic_challenge(pclient) -> None:
    response = pclient.post("/webhooks/pipedrive", json={"meta": {"id": "1"}})
    assert response.status_code == 401
    assert response.json["error"] == "missing_credentials"
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_attio_envelope_event_is_keyed_by_idempotency_key(pclient, sql) -> None:
    payload = {
        "webhook_id": "wh_1",
        "events": [{"event_type": "record.created", "id": {"record_id": "r1"}}],
    }
    headers = {"Idempotency-Key": "5b1a7f3e-attio"}
    assert deliver(pclient, "attio", payload, headers).json["events"][0]["status"] == "processed"
    assert deliver(pclient, "attio", payload, headers).json["events"][0]["status"] == "duplicate"
    assert effects(sql, "attio") == ["5b1a7f3e-attio"]
    two = {"webhook_id": "wh_1", "events": payload["events"] * 2}
    refused = deliver(pclient, "attio", two, {"Idempotency-Key": "other"})
    assert refused.status_code == 400
    assert refused.json["error"] == "batch_too_large"


def test_sha256_body_opt_in_dedupes_on_content(pclient, sql) -> None:
    first = deliver(pclient, "hashed", b'{"a": 1, "b": [1, 2]}')
    assert first.json["status"] == "processed"
    assert first.json["event_id"].startswith("sha256:") and len(first.json["event_id"]) == 71
    # Same document, other whitespace and key order: the same event.
    same = deliver(pclient, "hashed", b'{"b":[1,2],"a":1}')
    assert same.json == {**first.json, "status": "duplicate"}
    changed = deliver(pclient, "hashed", b'{"a": 1, "b": [1, 3]}')
    assert changed.json["status"] == "processed"
    assert len(effects(sql, "hashed")) == 2


# --- HubSpot: batches and the composite key ---


def hubspot_event(n: int, **override) -> dict:
    event = {
        "eventId": 1000 + n,
        "subscriptionId": 42,
        "portalId": 62515,
        "appId": 7,
        "occurredAt": 1700000000000 + n,
        "subscriptionType": "contact.propertyChange",
        "attemptNumber": 0,
        "objectId": 500 + n,
        "propertyName": "email",
    }
    event.update(override)
    return event


def test_hubspot_batch_of_100_with_a_shared_key_and_5_seen_before(pclient, sql) -> None:
    unique = [hubspot_event(n) for n in range(99)]
    # HubSpot's eventId is not unique on its own: same eventId, another subscription.
    unique[60] = hubspot_event(60, eventId=unique[59]["eventId"], subscriptionId=43)
    earlier = unique[10:15]
    response = deliver(pclient, "hubspot", earlier)
    assert response.status_code == 200
    assert [e["status"] for e in response.json["events"]] == ["processed"] * 5

    # One event twice in the batch (a HubSpot retry changes attemptNumber, not the key).
    batch = [*unique, {**unique[0], "attemptNumber": 1}]
    assert len(batch) == 100
    before = len(effects(sql, "hubspot"))
    response = deliver(pclient, "hubspot", batch)

    assert response.status_code == 200
    statuses = [e["status"] for e in response.json["events"]]
    assert len(statuses) == 100
    assert statuses.count("processed") == 94
    assert statuses.count("duplicate") == 6
    assert len(effects(sql, "hubspot")) - before == 94
    assert response.json["events"][0]["event_id"] == "62515:42:1000:1700000000000"
    assert len(set(effects(sql, "hubspot"))) == 99


def test_hubspot_batch_over_100_is_refused(pclient, sql) -> None:
    response = deliver(pclient, "hubspot", [hubspot_event(n) for n in range(101)])
    assert response.status_code == 400
    assert response.json["error"] == "batch_too_large"
    assert effects(sql, "hubspot") == []


def test_hubspot_behind_a_proxy_verifies_against_the_public_url(make_app, sql) -> None:
    app = make_app(PROVIDER_SOURCES, IDEMHOOK_PUBLIC_URL="https://hooks.example.com/")
    url, body, headers = signed(
        app, "hubspot", [hubspot_event(1)], base_url="https://hooks.example.com"
    )
    assert url == "https://hooks.example.com/webhooks/hubspot"
    # The proxy forwards to the app's own address; the signed URL is the public one.
    response = app.test_client().post("http://10.0.0.5:8000/webhooks/hubspot", data=body,
                                      headers=headers)  # fmt: skip
    assert response.status_code == 200, response.json


def test_hubspot_signed_query_string_counts(make_app) -> None:
    app = make_app(PROVIDER_SOURCES, IDEMHOOK_PUBLIC_URL="https://hooks.example.com")
    client = app.test_client()
    body = json.dumps([hubspot_event(1)]).encode()
    scheme = app.extensions["idemhook.receiver"].sources["hubspot"].scheme

    signed_url = "https://hooks.example.com/webhooks/hubspot?app=7&x=a%20b"
    headers = {"Content-Type": "application/json"}
    headers.update(scheme.sign(Delivery(body, method="POST", url=signed_url)))
    ok = client.post("/webhooks/hubspot?app=7&x=a%20b", data=body, headers=headers)
    assert ok.status_code == 200, ok.json
    other = client.post("/webhooks/hubspot?app=8&x=a%20b", data=body, headers=headers)
    assert other.status_code == 401
    assert other.json["error"] == "invalid_signature"


def test_hubspot_without_public_url_checks_the_request_url(make_app) -> None:
    app = make_app(PROVIDER_SOURCES)
    _, body, headers = signed(app, "hubspot", [hubspot_event(1)], base_url="https://public.io")
    response = app.test_client().post("http://10.0.0.5:8000/webhooks/hubspot", data=body,
                                      headers=headers)  # fmt: skip
    assert response.status_code == 401
    assert response.json["error"] == "invalid_signature"


@pytest.mark.parametrize(("trusted", "status"), [(0, 401), (1, 200)])
def test_forwarded_headers_count_only_when_trusted(make_app, trusted, status) -> None:
    app = make_app(PROVIDER_SOURCES, IDEMHOOK_TRUSTED_PROXIES=trusted)
    _, body, headers = signed(app, "hubspot", [hubspot_event(1)], base_url="https://public.io")
    forwarded = {**headers, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.io"}
    response = app.test_client().post("http://10.0.0.5:8000/webhooks/hubspot", data=body,
                                      headers=forwarded)  # fmt: skip
    assert response.status_code == status


# --- Salesforce outbound messages ---

NOTIFICATIONS = [
    {"Id": f"04l00000000000{n}AAA", "sObject": {"Id": f"003000000000{n}", "Email": f"{n}@x.io"}}
    for n in range(1, 4)
]


def test_salesforce_message_replayed_is_acked_twice_and_applied_once(pclient, sql) -> None:
    body = envelope(ORG, NOTIFICATIONS)
    for _ in range(2):
        response = deliver(pclient, "salesforce", body)
        assert response.status_code == 200
        assert response.mimetype == "text/xml"
        assert b"<Ack>true</Ack>" in response.data
    assert effects(sql, "salesforce") == [n["Id"] for n in NOTIFICATIONS]
    stored = sql("SELECT payload, event_type FROM processed_events WHERE source = 'salesforce'")
    assert stored[0].event_type == "Contact.04k000000000001AAA"
    assert stored[0].payload["sObject"]["Email"].endswith("@x.io")
    assert "SessionId" not in stored[0].payload


def test_salesforce_handler_failure_is_a_soap_fault_and_the_resend_completes(pclient, sql) -> None:
    body = envelope(ORG, NOTIFICATIONS)
    failing = NOTIFICATIONS[1]["Id"]
    sql("INSERT INTO test_failures (event_id, reason) VALUES (:e, 'crm down')", e=failing)
    response = deliver(pclient, "salesforce", body)
    assert response.status_code == 500
    assert b"<faultcode>soapenv:Server</faultcode>" in response.data
    assert failing.encode() in response.data
    assert effects(sql, "salesforce") == [NOTIFICATIONS[0]["Id"], NOTIFICATIONS[2]["Id"]]

    sql("DELETE FROM test_failures")
    response = deliver(pclient, "salesforce", body)
    assert b"<Ack>true</Ack>" in response.data
    assert effects(sql, "salesforce") == [n["Id"] for n in NOTIFICATIONS]


SOAP_OPEN = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
)
SOAP_CLOSE = b"</soapenv:Body></soapenv:Envelope>"


def test_scheme_answers_are_exact_on_the_wire(pclient, sql) -> None:
    # Providers parse these answers byte for byte (Salesforce's SOAP client above all).
    ping = deliver(
        pclient, "github", {"zen": "x"}, {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "p-1"}
    )
    assert (ping.status_code, ping.headers["Content-Type"]) == (200, "application/json")
    assert ping.data == b'{"source":"github","status":"pong"}\n'

    failing = NOTIFICATIONS[1]["Id"]
    sql("INSERT INTO test_failures (event_id, reason) VALUES (:e, 'crm down')", e=failing)
    fault = deliver(pclient, "salesforce", envelope(ORG, NOTIFICATIONS))
    assert (fault.status_code, fault.headers["Content-Type"]) == (500, "text/xml; charset=utf-8")
    assert fault.data == (
        SOAP_OPEN + b"<soapenv:Fault><faultcode>soapenv:Server</faultcode><faultstring>"
        b"1 of 3 notifications failed (first: 04l000000000002AAA); resend to retry them."
        b"</faultstring></soapenv:Fault>" + SOAP_CLOSE
    )

    sql("DELETE FROM test_failures")
    ack = deliver(pclient, "salesforce", envelope(ORG, NOTIFICATIONS))
    assert (ack.status_code, ack.headers["Content-Type"]) == (200, "text/xml; charset=utf-8")
    assert ack.data == (
        SOAP_OPEN + b'<notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound">'
        b"<Ack>true</Ack></notificationsResponse>" + SOAP_CLOSE
    )


def test_salesforce_from_another_org_is_refused(pclient, sql) -> None:
    response = deliver(pclient, "salesforce", envelope("00D000000000002EAA", NOTIFICATIONS))
    assert response.status_code == 401
    assert response.json["error"] == "invalid_organization"
    assert effects(sql, "salesforce") == []


@pytest.mark.parametrize(
    "body",
    [
        b"not xml",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',
        b'<Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body/></Envelope>',
    ],
    ids=["garbage", "dtd", "no-notifications"],
)
def test_salesforce_bad_xml_is_a_400(pclient, sql, body) -> None:
    response = deliver(pclient, "salesforce", body)
    assert response.status_code == 400
    assert response.json["error"] == "invalid_xml"
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
