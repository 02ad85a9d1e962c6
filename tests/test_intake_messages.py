"""Error messages that say what happened: the missing part of a composite ID, a failed batch."""

from __future__ import annotations

import re
from pathlib import Path

from idemhook._config.schemes import SCHEMES
from idemhook.testing import deliver
from tests.schemes.conftest import PROVIDER_SOURCES

ROOT = Path(__file__).resolve().parent.parent


def hubspot_event(**fields):
    event = {
        "eventId": 1001,
        "subscriptionId": 25,
        "portalId": 62515,
        "occurredAt": 1764316800000,
        "subscriptionType": "contact.creation",
        "objectId": 123,
    }
    event.update(fields)
    return {k: v for k, v in event.items() if v is not None}


def test_hubspot_missing_event_id_names_the_missing_part(make_app):
    client = make_app(PROVIDER_SOURCES).test_client()
    answer = deliver(client, "hubspot", [hubspot_event(eventId=None)])
    assert answer.status_code == 400 and answer.json["error"] == "missing_event_id"
    assert answer.json["message"] == (
        "The event id is missing: expected it at body:eventId (part 3 of "
        "[body:portalId, body:subscriptionId, body:eventId, body:occurredAt])."
    )
    other = deliver(client, "hubspot", [hubspot_event(portalId=None)])
    assert "body:portalId (part 1 of" in other.json["message"]


def test_a_failed_batch_of_one_does_not_speak_of_others(client, sql):
    sql("INSERT INTO test_failures VALUES ('b_only', 'CRM down')")
    answer = deliver(client, "batched", [{"id": "b_only", "type": "contact.created"}])
    assert answer.status_code == 500
    message = answer.json["message"]
    assert message.startswith("A handler failed for event 'b_only' (")
    assert message.endswith("nothing was recorded and a redelivery will run it again.")
    assert "others" not in message


def test_a_batch_where_every_event_failed_says_nothing_was_recorded(client, sql):
    sql("INSERT INTO test_failures VALUES ('b1', 'down'), ('b2', 'down')")
    answer = deliver(client, "batched", [{"id": "b1", "type": "t"}, {"id": "b2", "type": "t"}])
    assert answer.status_code == 500
    assert answer.json["message"] == (
        "All 2 events failed; nothing was recorded and a redelivery of the batch runs them "
        "all again."
    )
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0


def test_a_partly_failed_batch_still_says_the_others_are_recorded(client, sql):
    sql("INSERT INTO test_failures VALUES ('p2', 'down')")
    answer = deliver(client, "batched", [{"id": "p1", "type": "t"}, {"id": "p2", "type": "t"}])
    assert answer.status_code == 500
    assert answer.json["message"].startswith("1 of 2 events failed; the others are recorded")


def test_plugins_doc_names_the_hubspot_composite_key_the_scheme_uses():
    text = (ROOT / "docs" / "plugins.md").read_text()
    parts = [p.removeprefix("body:") for p in SCHEMES["hubspot"].defaults["event_id"]]
    assert ":".join(parts) in re.sub(r"\s+", " ", text.split("## The example plugin", 1)[1])
    assert "until the `hubspot` scheme supplies" not in text
