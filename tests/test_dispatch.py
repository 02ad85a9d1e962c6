"""One handler path (app/_engine/dispatch.py): the live claim, replay, retry and the test kit agree.

What a user would notice if they drifted apart: a handler that sees different
headers or payload when an operator replays or retries an event than when the
provider delivered it, or a ``Reject`` that means one thing live and another
on replay (before this, replay let a ``Reject`` escape and gave handlers no
headers at all).
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import text

from idemhook import handler
from idemhook.testing import deliver
from tests.conftest import SECRET, SOURCES
from tests.plugins import recorder, witness

WITNESS = {
    "plugins": [*SOURCES["plugins"], "tests.plugins.witness"],
    "sources": {
        **SOURCES["sources"],
        "witness": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "event_type": "body:type",
        },
    },
}
HEADERS = {"X-Witness": "seen-by-every-path"}


@pytest.fixture
def app(make_app, sql):
    for ddl in witness.TABLES:
        sql(ddl)
    yield make_app(WITNESS)
    sql("DROP TABLE IF EXISTS test_deferred")


def _run(runner, *args):
    result = runner.invoke(args=list(args))
    return result.exit_code, result.output


def test_replay_and_retry_see_the_event_the_live_delivery_saw(app, sql):
    client, runner = app.test_client(), app.test_cli_runner()
    event = {"id": "w1", "type": "thing.made", "n": 1}
    live = deliver(client, "witness", event, HEADERS)
    assert live.status_code == 200
    seen_live = live.json["result"]
    assert seen_live["header"] == "seen-by-every-path"

    code, output = _run(runner, "events", "replay", "witness", "w1", "--force", "--json")
    assert code == 0, output
    assert json.loads(output)["result"] == seen_live  # same id, type, payload, header, time

    # A failed delivery, retried by the operator: the handler sees the same event again.
    sql("INSERT INTO test_failures (event_id, reason) VALUES ('w2', 'CRM down')")
    failed = deliver(client, "witness", {"id": "w2", "type": "thing.made"}, HEADERS)
    assert failed.status_code == 500 and failed.json["error"] == "handler_failed"
    sql("DELETE FROM test_failures")
    code, output = _run(runner, "failures", "retry", "witness", "w2", "--json")
    assert code == 0, output
    [retried] = [json.loads(line) for line in output.splitlines()]
    assert retried["status"] == "processed"
    assert retried["detail"]["header"] == "seen-by-every-path"
    assert retried["detail"]["payload"] == {"id": "w2", "type": "thing.made"}


def test_reject_means_the_same_live_on_replay_and_on_retry(app, sql):
    client, runner = app.test_client(), app.test_cli_runner()
    rejected = deliver(client, "witness", {"id": "r1", "type": "t", "outcome": "reject"})
    assert rejected.json["status"] == "rejected"
    assert rejected.json["result"] == {"rejected": "witness refuses"}
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'r1'")[0][0] == 0

    # Replay: the same Reject rolls the handler's work back and changes nothing.
    assert deliver(client, "witness", {"id": "r2", "type": "t"}).json["status"] == "processed"
    sql("""UPDATE processed_events SET payload = payload || '{"outcome": "reject"}'
           WHERE event_id = 'r2'""")
    code, output = _run(runner, "events", "replay", "witness", "r2", "--force")
    assert code == 1 and "rejected the event (witness refuses)" in output
    assert sql("SELECT status, replay_count FROM processed_events WHERE event_id = 'r2'") == [
        ("processed", 0)
    ]
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'r2'")[0][0] == 1

    # Retry of a failed event whose handler now rejects: recorded as rejected, for good.
    sql("INSERT INTO test_failures (event_id, reason) VALUES ('r3', 'flaky')")
    body = {"id": "r3", "type": "t", "outcome": "reject"}
    assert deliver(client, "witness", body).status_code == 500
    sql("DELETE FROM test_failures")
    code, output = _run(runner, "failures", "retry", "witness", "r3", "--json")
    assert code == 0, output
    assert json.loads(output)["status"] == "rejected"
    assert sql("SELECT status FROM processed_events WHERE event_id = 'r3'") == [("rejected",)]
    assert sql(
        "SELECT permanent FROM delivery_failures WHERE event_id = 'r3' ORDER BY id"
    ) == [(False,), (True,)]


def test_the_test_kit_delivers_through_the_live_claim(idemhook):
    kit = idemhook(WITNESS)
    for ddl in (*recorder.TABLES, *witness.TABLES):
        kit.sql(ddl)
    answer = kit.deliver("witness", {"id": "k1", "type": "t"}, HEADERS)
    assert answer.json["result"]["header"] == "seen-by-every-path"
    row = kit.assert_processed("witness", "k1", result=answer.json["result"])
    assert row.headers["X-Witness"] == "seen-by-every-path"
    # The signature the kit added is never stored with the event.
    assert not any("signature" in name.lower() for name in row.headers)
    rejected = kit.deliver("witness", {"id": "k2", "type": "t", "outcome": "reject"})
    assert rejected.json["status"] == "rejected"
    kit.assert_rejected("witness", "k2", reason="witness refuses")


def test_a_commit_postgresql_refuses_answers_500_handler_failed_and_is_recorded(app, sql):
    client = app.test_client()
    answer = deliver(client, "witness", {"id": "c1", "type": "t", "defer": True})

    assert answer.status_code == 500
    assert answer.json["error"] == "handler_failed"
    assert "c1" in answer.json["message"]
    # Nothing of the transaction remains, and the on-call engineer can see why.
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 0
    [failure] = sql("SELECT event_id, error, traceback, permanent FROM delivery_failures")
    assert failure.event_id == "c1" and not failure.permanent
    assert "COMMIT" in failure.error and "IntegrityError" in failure.error
    assert "uq_test_deferred" in failure.traceback
    # The server keeps serving, on the same kept connection.
    assert deliver(client, "witness", {"id": "c2", "type": "t"}).json["status"] == "processed"


def test_a_batch_whose_commit_is_refused_fails_every_event_it_claimed(make_app, sql):
    for ddl in witness.TABLES:
        sql(ddl)
    config = {
        "plugins": WITNESS["plugins"],
        "sources": {
            **WITNESS["sources"],
            "witness": {**WITNESS["sources"]["witness"], "batch": "array", "max_batch": 5},
        },
    }
    try:
        client = make_app(config).test_client()
        # A duplicate, a new event, and one whose write breaks the deferred constraint.
        assert deliver(client, "witness", [{"id": "b0", "type": "t"}]).status_code == 200
        answer = deliver(
            client,
            "witness",
            [
                    {"id": "b0", "type": "t"},
                    {"id": "b1", "type": "t"},
                    {"id": "b2", "type": "t", "defer": True},
                ],
        )
        assert answer.status_code == 500 and answer.json["error"] == "handler_failed"
        assert [e["status"] for e in answer.json["events"]] == ["duplicate", "failed", "failed"]
        assert sql("SELECT event_id FROM processed_events") == [("b0",)]
        assert sorted(r[0] for r in sql("SELECT event_id FROM delivery_failures")) == ["b1", "b2"]
    finally:
        sql("DROP TABLE IF EXISTS test_deferred")


def test_the_claims_statements_are_visible_to_engine_events(app):
    # OpenTelemetry's SQLAlchemy instrumentation listens to these events.
    engine = app.extensions["idemhook.db"].engine
    seen: list[str] = []
    sa_event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    answer = deliver(app.test_client(), "witness", {"id": "v1", "type": "t"})
    assert answer.json["status"] == "processed"
    claim = [s for s in seen if "INSERT INTO processed_events" in s]
    assert claim and "SET LOCAL statement_timeout" in claim[0]
    assert any("INSERT INTO test_effects" in s for s in seen)
    assert any("COMMIT" in s for s in seen)


def test_handlers_see_the_configured_timeouts_in_their_transaction(make_app):
    @handler("acme", "*")
    def show(event, db):
        return {
            name: db.execute(text(f"SHOW {name}")).scalar()
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
        }

    app = make_app(IDEMHOOK_STATEMENT_TIMEOUT_MS=1234, IDEMHOOK_HANDLER_TIMEOUT_MS=5000)
    registry = app.extensions["idemhook.registry"]
    registry.registrations.clear()
    registry.add("acme", "*", show)
    answer = deliver(app.test_client(), "acme", {"id": "t1", "type": "x"})
    assert answer.json["result"] == {
        "statement_timeout": "1234ms",
        "lock_timeout": "1234ms",
        "idle_in_transaction_session_timeout": "6234ms",
    }
