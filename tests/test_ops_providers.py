"""Operator tools and the OpenAPI description with provider schemes (XML bodies, pings)."""

from __future__ import annotations

import json

from idemhook._config.schemes.salesforce_outbound import envelope
from idemhook.testing import deliver
from tests.schemes.conftest import ORG, PROVIDER_SOURCES
from tests.schemes.test_receiver import NOTIFICATIONS
from tests.test_openapi_routes import conforms

PATH = "/webhooks/{source}"


def test_salesforce_failure_is_retried_from_its_stored_xml(make_app, sql):
    app = make_app(PROVIDER_SOURCES)
    client = app.test_client()
    failing = NOTIFICATIONS[1]["Id"]
    sql("INSERT INTO test_failures (event_id, reason) VALUES (:e, 'crm down')", e=failing)
    fault = deliver(client, "salesforce", envelope(ORG, NOTIFICATIONS))
    assert fault.status_code == 500
    conforms(fault, PATH, "post")
    sql("DELETE FROM test_failures")

    result = app.test_cli_runner().invoke(
        args=["failures", "retry", "salesforce", failing, "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["status"] == "processed"
    applied = sql("SELECT event_id FROM test_effects WHERE source = 'salesforce' ORDER BY 1")
    assert [r.event_id for r in applied] == sorted(n["Id"] for n in NOTIFICATIONS)


def test_provider_specific_answers_match_the_spec(make_app):
    client = make_app(PROVIDER_SOURCES).test_client()
    ack = deliver(client, "salesforce", envelope(ORG, NOTIFICATIONS))
    assert ack.status_code == 200 and ack.mimetype == "text/xml"
    conforms(ack, PATH, "post")
    ping = deliver(
        client,
        "github",
        {"zen": "Keep it logically awesome.", "hook_id": 1},
        {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "ping-1"},
    )
    assert ping.json["status"] == "pong"
    conforms(ping, PATH, "post")
    challenge = client.post("/webhooks/pipedrive", json={"meta": {"id": "1"}})
    assert challenge.status_code == 401
    conforms(challenge, PATH, "post")
