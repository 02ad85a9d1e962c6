"""The claim: exactly once, duplicates answered with the original result, failures retryable.

Every test here runs on PostgreSQL and on SQLite (the demo backend).
"""

from __future__ import annotations

import pytest

from idemhook._engine.claim import DeliveryClaim
from idemhook.testing import deliver


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, pg_url, sqlite_url):
    """Both supported backends."""
    return pg_url if request.param == "postgresql" else sqlite_url


def effects(sql, event_id):
    return sql("SELECT count(*) FROM test_effects WHERE event_id = :e", e=event_id)[0][0]


def test_signed_event_is_processed_once_and_duplicate_answers_original_result(client, sql):
    event = {"id": "evt_1", "type": "contact.updated", "email": "a@example.com"}

    first = deliver(client, "acme", event)
    assert first.status_code == 200
    assert first.json == {
        "status": "processed",
        "event_id": "evt_1",
        "result": {"applied": "evt_1"},
    }
    assert effects(sql, "evt_1") == 1

    second = deliver(client, "acme", event)
    assert second.status_code == 200
    assert second.json == {
        "status": "duplicate",
        "event_id": "evt_1",
        "result": {"applied": "evt_1"},
    }
    assert effects(sql, "evt_1") == 1

    [row] = sql(
        "SELECT source, event_type, status, duplicate_count, payload, result, "
        "processed_at, received_at, last_seen_at FROM processed_events"
    )
    assert row.source == "acme" and row.event_type == "contact.updated"
    assert row.status == "processed"
    assert row.duplicate_count == 1
    assert row.processed_at is not None
    assert row.last_seen_at > row.received_at  # the duplicate was seen later


def test_event_without_handler_is_recorded_ignored(client, sql):
    response = deliver(client, "acme", {"id": "evt_2", "type": "invoice.paid"})
    assert response.status_code == 200
    assert response.json["status"] == "ignored"
    assert sql("SELECT status FROM processed_events WHERE event_id = 'evt_2'")[0][0] == "ignored"
    assert effects(sql, "evt_2") == 0
    assert deliver(client, "acme", {"id": "evt_2", "type": "invoice.paid"}).json["status"] == (
        "duplicate"
    )


def test_handler_error_rolls_back_everything_and_redelivery_applies_once(client, sql):
    sql("INSERT INTO test_failures VALUES ('evt_3', 'CRM is down')")
    event = {"id": "evt_3", "type": "contact.created"}

    failed = deliver(client, "acme", event)
    assert failed.status_code == 500
    assert failed.json["error"] == "handler_failed"
    assert "tests.plugins.recorder:record" in failed.json["message"]
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0  # no claim
    assert effects(sql, "evt_3") == 0  # its effect was written, then rolled back
    [failure] = sql(
        "SELECT source, event_id, event_type, error, traceback, raw_body, "
        "failed_at FROM delivery_failures"
    )
    assert (failure.source, failure.event_id, failure.event_type) == (
        "acme",
        "evt_3",
        "contact.created",
    )
    assert "RuntimeError: CRM is down" in failure.error
    assert "RuntimeError" in failure.traceback and failure.failed_at is not None
    assert bytes(failure.raw_body) == b'{"id": "evt_3", "type": "contact.created"}'

    sql("DELETE FROM test_failures")  # the fix
    retried = deliver(client, "acme", event)
    assert retried.status_code == 200 and retried.json["status"] == "processed"
    assert effects(sql, "evt_3") == 1


def test_batch_failure_keeps_finished_events_and_redelivery_runs_only_the_failed(client, sql):
    batch = [{"id": f"b{i}", "type": "contact.updated"} for i in range(3)]
    sql("INSERT INTO test_failures VALUES ('b1', 'bad row')")

    failed = deliver(client, "batched", batch)
    assert failed.status_code == 500
    assert failed.json["error"] == "handler_failed"
    assert [(e["event_id"], e["status"]) for e in failed.json["events"]] == [
        ("b0", "processed"),
        ("b1", "failed"),
        ("b2", "processed"),
    ]
    assert sorted(r[0] for r in sql("SELECT event_id FROM processed_events")) == ["b0", "b2"]
    assert sql("SELECT event_id FROM delivery_failures")[0][0] == "b1"
    assert effects(sql, "b1") == 0

    sql("DELETE FROM test_failures")
    retried = deliver(client, "batched", batch)
    assert retried.status_code == 200
    assert [(e["event_id"], e["status"]) for e in retried.json["events"]] == [
        ("b0", "duplicate"),
        ("b1", "processed"),
        ("b2", "duplicate"),
    ]
    assert [effects(sql, f"b{i}") for i in range(3)] == [1, 1, 1]


def test_duplicate_inside_one_batch_is_applied_once(client, sql):
    batch = [{"id": "same", "type": "x"}, {"id": "same", "type": "x"}]
    response = deliver(client, "batched", batch)
    assert response.status_code == 200
    assert [e["status"] for e in response.json["events"]] == ["processed", "duplicate"]
    assert effects(sql, "same") == 1


def test_event_id_from_header_and_integer_ids(client, sql):
    response = client.post("/webhooks/open", json={"n": 1}, headers={"X-Event-Id": "hdr-1"})
    assert response.status_code == 200 and response.json["event_id"] == "hdr-1"
    numeric = deliver(client, "acme", {"id": 12345, "type": "contact.updated"})
    assert numeric.status_code == 200 and numeric.json["event_id"] == "12345"


def test_payload_that_jsonb_refuses_is_stored_faithfully(client, sql):
    raw = b'{"id": "evt_nul", "type": "contact.updated", "note": "a\\u0000b", "s": "\\ud800"}'
    response = deliver(client, "acme", raw)
    assert response.status_code == 200 and response.json["status"] == "processed"
    app = client.application
    from idemhook._store.models import ProcessedEvent

    with app.extensions["idemhook.db"].session() as session:
        stored = session.query(ProcessedEvent).one().payload
    assert stored["note"] == "a\x00b" and stored["s"] == "\ud800"


def test_handler_that_commits_is_stopped_and_its_effect_rolled_back(make_app, sql):
    from tests.conftest import SOURCES

    client = make_app({**SOURCES, "plugins": ["tests.plugins.misbehaving"]}).test_client()
    response = deliver(client, "acme", {"id": "evt_c", "type": "misbehave.commit"})
    assert response.status_code == 500
    assert effects(sql, "evt_c") == 0
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    [error] = sql("SELECT error FROM delivery_failures")[0]
    assert "must not commit" in error


def test_a_lost_connection_is_answered_from_what_committed_never_by_running_again(app, client):
    # After a connection dies at or after the handlers, the claim looks the events up on a
    # fresh connection instead of running them again: a committed claim (our COMMIT landed,
    # or another delivery applied it meanwhile) is the duplicate it now is; else 503.
    from datetime import UTC, datetime

    from sqlalchemy.exc import OperationalError
    from werkzeug.datastructures import Headers

    from idemhook._contract import (
        Event,
    )
    from idemhook._values.errors import ServiceUnavailable
    from idemhook._values.outcome import Status

    applied = deliver(client, "acme", {"id": "lost-1", "type": "contact.updated"})
    assert applied.json["status"] == "processed"
    claimer = app.extensions["idemhook.receiver"].claimer
    lost = OperationalError("COMMIT", {}, Exception("server closed the connection"))

    def event(event_id):
        return Event("acme", event_id, "contact.updated", {}, Headers(), datetime.now(UTC))



    [outcome] = DeliveryClaim(claimer, [event("lost-1")], b"").resolve(lost)
    assert outcome.status is Status.DUPLICATE
    assert outcome.result == applied.json["result"]
    with pytest.raises(ServiceUnavailable) as refused:
        DeliveryClaim(claimer, [event("lost-1"), event("lost-2")], b"").resolve(lost)
    assert refused.value.code == "database_unavailable"
