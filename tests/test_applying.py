"""Applying received events (app/_engine/applier.py), in process, on the real test database.

``apply_due`` runs what ``idemhook worker`` runs, one batch after another, without
the process around it (real worker processes: ``tests/reliability/test_async_worker.py``).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime

import pytest

from idemhook._engine.applier import Applier, apply_due
from idemhook._web.metrics import Metrics
from idemhook.testing import Kit, deliver
from tests.test_accept import ASYNC

SOURCES = {
    "plugins": ["tests.plugins.queued", "examples.email_api.sender"],
    "sources": {
        "queued": {**ASYNC, "event_type": "body:type", "max_attempts": 2, "backoff_seconds": 60},
        "queued_batch": {**ASYNC, "batch": "array", "backoff_seconds": 0.05},
        "ordered": {**ASYNC, "order_key": "body:key", "backoff_seconds": 60},
        "unhandled": ASYNC,
    },
}


@pytest.fixture
def app(make_app):
    return make_app(SOURCES)


@pytest.fixture
def send(app):
    client = app.test_client()

    def post(source, payload, headers=None):
        answer = deliver(client, source, payload, headers)
        assert answer.status_code == 202, answer.json
        return answer

    return post


def row(sql, event_id):
    return sql(
        "SELECT status, result, attempts, processed_at FROM processed_events WHERE event_id = :e",
        e=event_id,
    )[0]


def failures(sql):
    return sql("SELECT event_id, permanent, error FROM delivery_failures ORDER BY id")


def test_a_failed_attempt_and_its_failure_row_commit_together_or_not_at_all(app, send, sql):
    # The worker commits a failed attempt (its count, its backoff): its delivery_failures
    # row is in that transaction, so nobody ever sees the attempt without its row. Shown
    # by a failure row PostgreSQL refuses: the attempt is not recorded either.
    send("queued", {"id": "f1", "type": "t", "fail": "always"})
    sql(
        "CREATE FUNCTION refuse_failure() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'no failure rows today'; END $$"
    )
    sql(
        "CREATE TRIGGER refuse_failure BEFORE INSERT ON delivery_failures "
        "FOR EACH ROW EXECUTE FUNCTION refuse_failure()"
    )
    try:
        with pytest.raises(Exception, match="no failure rows today"):
            apply_due(app)
    finally:
        sql("DROP TRIGGER refuse_failure ON delivery_failures")
        sql("DROP FUNCTION refuse_failure()")
    assert (row(sql, "f1").status, row(sql, "f1").attempts) == ("received", 0)
    assert failures(sql) == []
    assert apply_due(app) == 1  # the next look counts the attempt, with its row
    assert row(sql, "f1").attempts == 1
    assert [(e, permanent) for e, permanent, _ in failures(sql)] == [("f1", False)]


def test_each_outcome_is_recorded_with_the_handlers_work_and_leaves_the_queue(app, send, sql):
    send("queued", {"id": "ok", "type": "t"})
    send("queued", {"id": "skip", "type": "t", "ignore": "not ours"})
    send("queued", {"id": "no", "type": "t", "reject": "malformed"})
    send("unhandled", {"id": "lonely"})
    assert apply_due(app) == 4
    assert row(sql, "ok").status == "processed" and row(sql, "ok").result == {"applied": "ok"}
    assert row(sql, "ok").processed_at is not None
    assert (row(sql, "skip").status, row(sql, "skip").result) == (
        "ignored",
        {"ignored": "not ours"},
    )
    assert (row(sql, "no").status, row(sql, "no").result) == ("rejected", {"rejected": "malformed"})
    assert (row(sql, "lonely").status, row(sql, "lonely").result) == ("ignored", None)
    # The rejected event's work was rolled back; the others' kept (Ignore keeps it too).
    assert sorted(e for (e,) in sql("SELECT event_id FROM test_applied")) == ["ok", "skip"]
    assert failures(sql) == [
        ("no", True, "tests.plugins.queued:apply rejected the event: malformed")
    ]
    assert sql("SELECT count(*) FROM event_queue") == [(0,)]
    assert apply_due(app) == 0  # nothing left


def test_a_failure_rolls_its_work_back_and_waits_its_backoff_then_fails_for_good(app, send, sql):
    send("queued", {"id": "bad", "type": "t", "fail": "always"})
    send("queued", {"id": "good", "type": "t"})
    before = datetime.now(UTC)
    assert apply_due(app) == 2
    bad = row(sql, "bad")
    assert (bad.status, bad.attempts, bad.result) == ("received", 1, None)
    [(due,)] = sql("SELECT next_attempt_at FROM event_queue")
    assert (due - before).total_seconds() >= 30  # half of the first step (60 s), at least
    assert apply_due(app) == 0  # not due yet
    assert [e for (e,) in sql("SELECT event_id FROM test_applied")] == ["good"]

    sql("UPDATE event_queue SET next_attempt_at = now()")  # the backoff is over
    assert apply_due(app) == 1
    bad = row(sql, "bad")
    assert (bad.status, bad.attempts) == ("failed", 2)  # max_attempts = 2
    assert bad.result == {"failed": "tests.plugins.queued:apply raised RuntimeError"}
    assert [(e, p) for e, p, _ in failures(sql)] == [("bad", False), ("bad", False)]
    assert sql("SELECT count(*) FROM event_queue") == [(0,)]


def test_handlers_see_the_event_as_delivered_and_can_add_outbox_messages(app, send, sql):
    answer = send("queued", {"id": "m1", "type": "t", "mail": True}, {"X-Request-Id": "r-9"})
    assert answer.json["status"] == "accepted"
    apply_due(app)
    [message] = sql("SELECT kind, key, source, event_id, payload FROM outbox_messages")
    assert (message.kind, message.key, message.source, message.event_id) == (
        "email",
        "queued:m1:0",
        "queued",
        "m1",
    )
    [stored] = sql("SELECT headers, received_at, processed_at FROM processed_events")
    assert stored.headers["X-Request-Id"] == "r-9" and "X-Signature" not in stored.headers


def test_a_batch_of_quick_handlers_commits_them_together_and_one_failure_alone(app, send, sql):
    send("queued_batch", [{"id": f"q{n}", **({"fail": 1} if n == 3 else {})} for n in range(8)])
    applier = Applier(
        app.extensions["idemhook.db"],
        app.extensions["idemhook.registry"],
        app.extensions["idemhook.receiver"].sources,
        batch=50,
    )
    sizes = []
    while True:
        batch = applier.run_batch(Running())
        if batch is None:
            break
        sizes.append(len(batch.applied))
        applier.report(batch)
        time.sleep(0.06)  # the one failure's backoff (0.05 s at most) passes
    assert sizes[0] == 1 and max(sizes) > 1  # batches grow while handlers are quick
    assert sql("SELECT count(*) FROM processed_events WHERE status = 'processed'") == [(8,)]
    assert sorted(e for (e,) in sql("SELECT event_id FROM test_applied")) == [
        f"q{n}" for n in range(8)
    ]
    assert [e for e, _, _ in failures(sql)] == ["q3"]


class Running:
    stopping = False


def test_a_failing_head_blocks_its_order_key_until_it_is_done_and_other_keys_go_on(
    app, send, sql, runner
):
    send("ordered", {"id": "a1", "key": "a", "fail": 1})
    send("ordered", {"id": "a2", "key": "a"})
    send("ordered", {"id": "b1", "key": "b"})
    assert apply_due(app) == 2  # a1 failed (backoff 60 s): a2 must wait; b1 goes
    assert [e for (e,) in sql("SELECT event_id FROM test_applied ORDER BY n")] == ["b1"]
    assert apply_due(app) == 0

    result = runner.invoke(args=["failures", "retry", "ordered", "a1"])  # due now
    assert result.exit_code == 0, result.output
    assert "ordered/a1: accepted (due now for idemhook worker (was received))" in result.output
    assert apply_due(app) == 2
    assert [e for (e,) in sql("SELECT event_id FROM test_applied ORDER BY n")] == [
        "b1",
        "a1",
        "a2",
    ]


def test_failed_unblocks_its_key_and_failures_retry_puts_it_back_first(app, make_app, sql):
    config = {**SOURCES, "sources": {**SOURCES["sources"]}}
    config["sources"]["ordered"] = {**ASYNC, "order_key": "body:key", "max_attempts": 1}
    app = make_app(config)
    client = app.test_client()
    for event in ({"id": "x1", "key": "x", "fail": 1}, {"id": "x2", "key": "x"}):
        deliver(client, "ordered", event)
    assert apply_due(app) == 2  # x1 failed for good (one attempt allowed): x2 goes
    assert row(sql, "x1").status == "failed"
    deliver(client, "ordered", {"id": "x3", "key": "x", "sleep": 0})
    result = app.test_cli_runner().invoke(args=["failures", "retry", "ordered", "x1"])
    assert "ordered/x1: accepted (due now for idemhook worker (was failed))" in result.output
    assert row(sql, "x1").attempts == 0
    assert apply_due(app) == 2  # x1 is its key's head again: before x3
    assert [e for (e,) in sql("SELECT event_id FROM test_applied ORDER BY n")] == [
        "x2",
        "x1",
        "x3",
    ]


def test_operators_see_waiting_events_and_replay_refuses_them(app, send, runner, sql):
    send("ordered", {"id": "w1", "key": "deal-1", "fail": 1})
    apply_due(app)
    listed = runner.invoke(args=["events", "list", "--status", "received"])
    assert listed.exit_code == 0, listed.output
    header, line = listed.output.splitlines()[:2]
    assert header.lower().split() == [
        "received_at",
        "source",
        "event_id",
        "event_type",
        "status",
        "attempts",
        "next_attempt_at",
        "order_key",
        "interruptions",
    ]
    assert line.split()[1:5] == ["ordered", "w1", "-", "received"]
    assert line.split()[5] == "1" and line.split()[7:] == ["deal-1", "0"]
    refused = runner.invoke(args=["events", "replay", "ordered", "w1", "--force"])
    assert refused.exit_code == 1
    assert "has not been applied yet: it waits for idemhook worker" in refused.output
    pending = runner.invoke(args=["failures", "list", "--pending", "--json"])
    assert '"resolved": false' in pending.output and '"event_id": "w1"' in pending.output

    sql("UPDATE event_queue SET next_attempt_at = now()")
    apply_due(app)
    replayed = runner.invoke(args=["events", "replay", "ordered", "w1", "--force"])
    assert replayed.exit_code == 0, replayed.output
    assert sql("SELECT count(*) FROM test_applied WHERE event_id = 'w1'") == [(2,)]
    resolved = runner.invoke(args=["failures", "list", "--json"])
    assert '"resolved": true' in resolved.output


def test_pruning_never_takes_an_event_that_waits_for_the_worker(app, send, runner, sql):
    send("queued", {"id": "old", "type": "t", "fail": "always"})
    send("queued", {"id": "done", "type": "t"})
    apply_due(app)
    sql("UPDATE processed_events SET received_at = now() - interval '90 days'")
    result = runner.invoke(args=["events", "prune", "--older-than", "30d"])
    assert result.exit_code == 0, result.output
    assert sql("SELECT event_id, status FROM processed_events") == [("old", "received")]


def test_metrics_count_the_queue_and_what_the_worker_did(app, send, sql):
    send("queued", {"id": "m1", "type": "t"})
    send("ordered", {"id": "m2", "key": "k"})
    sql("UPDATE event_queue SET received_at = now() - interval '90 seconds'")
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'idemhook_events_queued{source="queued"} 1.0' in text
    assert 'idemhook_events_queued{source="queued_batch"} 0.0' in text
    ages = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('idemhook_events_oldest_queued_age_seconds{source="queued"}')
    ]
    assert ages and 90 <= ages[0] < 3600
    assert 'idemhook_events_total{outcome="accepted",source="queued",type="t"} 1.0' in text

    metrics = Metrics()
    applier = Applier(
        app.extensions["idemhook.db"],
        app.extensions["idemhook.registry"],
        app.extensions["idemhook.receiver"].sources,
        metrics=metrics,
    )
    while (batch := applier.run_batch(Running())) is not None:
        applier.report(batch)
    from prometheus_client import generate_latest

    worker_text = generate_latest(metrics.registry).decode()
    assert 'idemhook_events_total{outcome="processed",source="queued",type="t"} 1.0' in worker_text
    assert 'idemhook_events_processing_delay_seconds_count{source="ordered"} 1.0' in worker_text
    assert 'idemhook_handler_duration_seconds_count{source="queued"} 1.0' in worker_text
    assert app.test_client().get("/readyz").json["status"] == "ok"  # no worker involved


def test_the_test_kit_applies_received_events_for_plugin_authors(pg_url):
    from idemhook.testing.receiver import build

    kit = Kit(build(pg_url, SOURCES, {}, migrate=False))
    try:
        assert kit.deliver("queued", {"id": "k1", "type": "t"}).status_code == 202
        assert kit.apply_received() == 1
        kit.assert_processed("queued", "k1", result={"applied": "k1"})
        kit.sql("TRUNCATE processed_events, test_applied")
    finally:
        kit.close()


def test_a_source_switched_back_to_sync_still_has_its_waiting_events_applied(make_app, sql):
    queued = make_app(SOURCES)
    deliver(queued.test_client(), "unhandled", {"id": "left"})
    sync = {key: value for key, value in ASYNC.items() if key != "mode"}
    later = make_app({**SOURCES, "sources": {**SOURCES["sources"], "unhandled": sync}})
    assert apply_due(later) == 1
    assert sql("SELECT status FROM processed_events") == [("ignored",)]


def test_the_take_reads_the_queue_through_its_indexes(app, sql, pg_url):
    """20,000 waiting events over 2,000 order keys: the take and its head check stay index reads."""
    sql(
        "INSERT INTO processed_events (source, event_id, status, received_at, payload, "
        "duplicate_count, last_seen_at, order_key) SELECT 'ordered', 'e' || g, 'received', "
        "now(), '{}', 0, now(), 'k' || (g % 2000) FROM generate_series(1, 20000) AS g"
    )
    sql(
        "INSERT INTO event_queue SELECT id, source, order_key, received_at, received_at "
        "FROM processed_events"
    )
    sql("ANALYZE event_queue")
    sql("ANALYZE processed_events")
    applier = Applier(
        app.extensions["idemhook.db"],
        app.extensions["idemhook.registry"],
        app.extensions["idemhook.receiver"].sources,
    )
    engine = app.extensions["idemhook.db"].engine
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (FORMAT JSON) " + applier.queue._take_sql, {"limit": 50})
        plan = json.dumps(cursor.fetchone()[0])
    finally:
        raw.rollback()
        raw.close()
    assert "ix_event_queue_due" in plan and "ix_event_queue_order" in plan
    # No table of the queue is read whole; the paused sources (a row per paused source)
    # are read once per take, into a hashed set.
    scanned = re.findall(r'"Node Type": "Seq Scan", [^{}]*?"Relation Name": "(\w+)"', plan)
    assert set(scanned) <= {"source_pauses"}, scanned
    assert apply_due(app, limit=50) >= 50
    # Only heads were taken: each key's applied events are its first ones, in order.
    applied = sql(
        "SELECT e.order_key, array_agg(e.id ORDER BY a.n) FROM test_applied a "
        "JOIN processed_events e ON e.event_id = a.event_id GROUP BY 1"
    )
    for key, ids in applied:
        [(first,)] = sql(
            "SELECT array_agg(id ORDER BY id) FROM (SELECT id FROM processed_events "
            "WHERE order_key = :k ORDER BY id LIMIT :n) AS f",
            k=key,
            n=len(ids),
        )
        assert ids == first, key
