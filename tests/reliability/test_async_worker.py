"""Asynchronous sources with real ``idemhook worker`` processes and a real gunicorn.

Deliveries go to the shipped gunicorn (``tests/servers.py``), which answers at
once; the workers apply the events through the test plugin ``tests.plugins.queued``,
whose every application writes one ``test_applied`` row (with a sequence number and
the worker's pid) in the handler's transaction, so an event applied twice, lost, or
applied out of order shows in that table.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import requests
from sqlalchemy import create_engine, text

from idemhook._engine.applier import MAX_INTERRUPTIONS
from idemhook.testing.postgres import connect_args
from tests.conftest import SECRET
from tests.plugins.queued import APPLICATION_NAME_PREFIX, LOCK_KEY
from tests.reliability.conftest import GUARD_SECONDS, signed_post, wait_for
from tests.servers import gunicorn, start_worker, toml, worker

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

ASYNC = {
    "scheme": "hmac-sha256",
    "secret": SECRET,
    "event_id": "body:id",
    "mode": "async",
    "backoff_seconds": 0.2,
    "max_backoff_seconds": 1,
}
ASYNC_SOURCES = {
    "plugins": ["tests.plugins.queued"],
    "sources": {
        "queued": {**ASYNC, "max_attempts": 3},
        "queued_batch": {**ASYNC, "batch": "array"},
        "ordered": {**ASYNC, "order_key": "body:key"},
    },
}
#: A quicker poll than the default second (the fallback; NOTIFY wakes the workers).
WORKER_ENV = {"IDEMHOOK_WORKER_POLL_MS": "200"}


def status_of(sql, event_id: str, source: str = "queued"):
    rows = sql(
        "SELECT status, attempts, result, received_at, processed_at FROM processed_events "
        "WHERE source = :source AND event_id = :event_id",
        source=source,
        event_id=event_id,
    )
    return rows[0] if rows else None


def applied(sql, event_id: str) -> list:
    return sql("SELECT n, pid FROM test_applied WHERE event_id = :e ORDER BY n", e=event_id)


def processed_count(sql) -> int:
    return sql("SELECT count(*) FROM processed_events WHERE status = 'processed'")[0][0]


def test_a_storm_of_200_ids_x_10_deliveries_is_applied_once_each_by_3_workers(clean_db, sql):
    ids = [f"storm-{i}" for i in range(200)]
    payloads = [{"id": event_id, "sleep": 0.002} for event_id in ids for _ in range(10)]
    random.Random(14).shuffle(payloads)
    with (
        gunicorn(ASYNC_SOURCES, clean_db) as server,
        worker(ASYNC_SOURCES, clean_db, count=3, env=WORKER_ENV),
    ):
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(lambda p: signed_post(server.url, "queued", p), payloads))
        wait_for(lambda: processed_count(sql) == len(ids), "all 200 events to be processed")

    assert len(answers) == 2000
    codes = Counter(a.status_code for a in answers)
    assert set(codes) <= {202, 200} and codes[202] >= len(ids), codes
    for answer in answers:
        body = answer.json()
        if answer.status_code == 202:  # new, or a duplicate while it waits for a worker
            assert body == {"event_id": body["event_id"], "status": "accepted"}
        else:  # a duplicate of an event a worker has applied: its stored result
            assert body == {
                "event_id": body["event_id"],
                "status": "duplicate",
                "result": {"applied": body["event_id"]},
            }
    assert sql("SELECT event_id, count(*) FROM test_applied GROUP BY 1 ORDER BY 1") == [
        (event_id, 1) for event_id in sorted(ids)
    ]
    assert sql(
        "SELECT count(*), sum(duplicate_count), max(attempts) FROM processed_events "
        "WHERE status = 'processed'"
    ) == [(200, 1800, 0)]
    assert sql("SELECT count(*) FROM delivery_failures") == [(0,)]


def test_a_worker_killed_mid_handler_leaves_the_event_to_another_which_applies_it_once(
    clean_db, sql
):
    holder = psycopg2.connect(**connect_args(clean_db))
    holder.autocommit = True
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        with (
            gunicorn(ASYNC_SOURCES, clean_db) as server,
            worker(ASYNC_SOURCES, clean_db, count=2, env=WORKER_ENV) as workers,
        ):
            answer = signed_post(server.url, "queued", {"id": "k1", "block": True})
            assert answer.status_code == 202
            first = wait_for(lambda: blocked_worker(sql), "a worker's handler to block")
            [victim] = [w for w in workers if w.pid == first]
            [survivor] = [w for w in workers if w.pid != first]
            victim.kill()  # SIGKILL in the middle of the handler's transaction
            # Its connection closed, PostgreSQL rolled its transaction back and dropped its
            # row lock: the other worker takes the event and blocks in the handler in turn.
            wait_for(lambda: blocked_worker(sql) == survivor.pid, "the event to be retaken")
            assert status_of(sql, "k1").status == "received"
            with holder.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            wait_for(lambda: status_of(sql, "k1").status == "processed", "the retaken event")
            survivor.wait_log("event_id=k1 event_type=- outcome=processed")
    finally:
        holder.close()
    # The killed worker's effect was rolled back with its transaction: applied once.
    assert [pid for _n, pid in applied(sql, "k1")] == [survivor.pid]
    row = status_of(sql, "k1")
    assert (row.attempts, row.result) == (0, {"applied": "k1"})  # a death is no failed attempt
    assert sql("SELECT count(*) FROM delivery_failures") == [(0,)]
    # ... but it is remembered: one worker ended while it held the event.
    assert sql("SELECT interruptions FROM processed_events WHERE event_id = 'k1'") == [(1,)]


def test_an_event_that_kills_every_worker_ends_failed_and_the_others_are_applied_once(
    clean_db, sql, tmp_path
):
    # An event whose handler takes its process down (the OOM killer, a crash in native
    # code) must not take down every worker forever: after MAX_INTERRUPTIONS it ends
    # failed without running, and the events beside it are applied, each once.
    config = tmp_path / "webhooks.toml"
    config.write_text(toml(ASYNC_SOURCES))
    events = [*(f"before-{n}" for n in range(4)), "poison", *(f"after-{n}" for n in range(4))]
    with gunicorn(ASYNC_SOURCES, clean_db) as server:
        for event_id in events:  # one at a time: received in this order
            payload = {"id": event_id, "die": event_id == "poison"}
            assert signed_post(server.url, "queued", payload).status_code == 202
    for n in range(MAX_INTERRUPTIONS):
        doomed = start_worker(config, clean_db, env=WORKER_ENV, log_path=tmp_path / f"w{n}.log")
        assert doomed.process.wait(timeout=GUARD_SECONDS) == -signal.SIGKILL, doomed.log()
    assert sql(
        "SELECT status, interruptions FROM processed_events WHERE event_id = 'poison'"
    ) == [("received", MAX_INTERRUPTIONS)]
    with worker(ASYNC_SOURCES, clean_db, env=WORKER_ENV) as survivor:
        wait_for(lambda: processed_count(sql) == len(events) - 1, "the other events")
        wait_for(lambda: status_of(sql, "poison").status == "failed", "the poison to fail")
        survivor.wait_log("event_id=poison event_type=- outcome=failed")
        assert survivor.process.poll() is None  # alive: the poison never ran again
    poison = status_of(sql, "poison")
    failed = {"failed": "idemhook worker raised RuntimeError"}
    assert (poison.attempts, poison.result) == (0, failed)
    [(error,)] = sql("SELECT error FROM delivery_failures WHERE event_id = 'poison'")
    assert error.startswith(
        f"idemhook worker raised RuntimeError: {MAX_INTERRUPTIONS} idemhook worker processes "
        "ended (killed, out of memory, a crash) while they applied this event"
    )
    # Every other event applied once; its batch-mates at the first death were counted once,
    # and never again: an event with interruptions is taken alone.
    assert sql("SELECT event_id, count(*) FROM test_applied GROUP BY 1 ORDER BY 1") == [
        (event_id, 1) for event_id in sorted(events) if event_id != "poison"
    ]
    blamed = dict(
        sql("SELECT event_id, interruptions FROM processed_events WHERE event_id <> 'poison'")
    )
    assert set(blamed.values()) == {0, 1}, blamed
    assert sql("SELECT count(*) FROM delivery_failures WHERE event_id <> 'poison'") == [(0,)]


def blocked_worker(sql) -> int | None:
    """The pid of the worker whose handler waits for the test's advisory lock, if any (in
    this run's database only: a second suite beside this one runs the same test)."""
    rows = sql(
        "SELECT application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE :prefix "
        "AND wait_event_type = 'Lock'",
        prefix=APPLICATION_NAME_PREFIX + "%",
    )
    return int(rows[0][0][len(APPLICATION_NAME_PREFIX) :]) if rows else None


def test_fails_twice_then_succeeds_after_two_backoffs_and_always_failing_ends_failed(
    clean_db, sql, pg_url
):
    with (
        gunicorn(ASYNC_SOURCES, clean_db) as server,
        worker(ASYNC_SOURCES, clean_db, env=WORKER_ENV) as running,
    ):
        assert signed_post(server.url, "queued", {"id": "twice", "fail": 2}).status_code == 202
        assert signed_post(server.url, "queued", {"id": "never", "fail": 3}).status_code == 202
        wait_for(lambda: status_of(sql, "twice").status == "processed", "'twice' to succeed")
        wait_for(lambda: status_of(sql, "never").status == "failed", "'never' to end failed")
        running.wait_log("event_id=never event_type=- outcome=failed")

        twice = status_of(sql, "twice")
        assert (twice.attempts, twice.result) == (2, {"applied": "twice"})
        # Two backoffs, each at least half its step (0.2 s, then 0.4 s).
        assert (twice.processed_at - twice.received_at).total_seconds() >= 0.1 + 0.2
        never = status_of(sql, "never")
        assert never.attempts == 3  # max_attempts of the source
        assert never.result == {"failed": "tests.plugins.queued:apply raised RuntimeError"}
        log = running.log()
        for event_id, outcomes in (
            ("twice", [("1", "retry"), ("2", "retry"), ("3", "processed")]),
            ("never", [("1", "retry"), ("2", "retry"), ("3", "failed")]),
        ):
            lines = re.findall(rf"event_id={event_id} \S+ outcome=(\w+) attempt=(\d)", log)
            assert [(a, o) for o, a in lines] == outcomes
        failures = sql(
            "SELECT event_id, permanent, error FROM delivery_failures ORDER BY event_id, id"
        )
        assert [(f.event_id, f.permanent) for f in failures] == [
            *[("never", False)] * 3,
            *[("twice", False)] * 2,
        ]
        assert failures[0].error == "tests.plugins.queued:apply raised RuntimeError: failure 1 of 3"
        # A delivery of the failed event is answered with its state, and runs nothing.
        again = signed_post(server.url, "queued", {"id": "never", "fail": 3})
        assert again.status_code == 200 and again.json()["status"] == "duplicate"

        # An operator retries it: a fresh set of attempts, and (three failures recorded
        # now) the handler succeeds.
        runner = app_runner(pg_url)
        result = runner.invoke(args=["failures", "retry", "queued", "never"])
        assert result.exit_code == 0, result.output
        assert "queued/never: accepted (due now for idemhook worker (was failed))" in result.output
        wait_for(lambda: status_of(sql, "never").status == "processed", "the retried event")
    assert [e for (e,) in sql("SELECT event_id FROM test_applied ORDER BY n")] == [
        "twice",
        "never",
    ]


def app_runner(url):
    from idemhook import create_app

    app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": ASYNC_SOURCES})
    return app.test_cli_runner()


def test_order_keys_50_events_x_20_keys_shuffled_apply_in_receipt_order_per_key(clean_db, sql):
    keys = [f"deal-{k}" for k in range(20)]
    events = [{"id": f"{key}/{n}", "key": key, "sleep": 0.002} for key in keys for n in range(50)]
    rng = random.Random(1414)
    rng.shuffle(events)
    for event in rng.sample(events, 60):  # some fail once: their key waits out the backoff
        event["fail"] = 1
    with (
        gunicorn(ASYNC_SOURCES, clean_db) as server,
        worker(ASYNC_SOURCES, clean_db, count=3, env=WORKER_ENV),
    ):
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda p: signed_post(server.url, "ordered", p), events))
        assert Counter(a.status_code for a in answers) == {202: len(events)}
        wait_for(
            lambda: processed_count(sql) == len(events),
            "all 1,000 events to be processed",
            timeout=300,
        )

    received = defaultdict(list)  # per key, in receipt order (the claim's id)
    for key, event_id in sql("SELECT order_key, event_id FROM processed_events ORDER BY id"):
        received[key].append(event_id)
    applications = defaultdict(list)  # per key, in the order the handlers' writes committed
    for key, event_id in sql("SELECT key, event_id FROM test_applied ORDER BY n"):
        applications[key].append(event_id)
    assert set(received) == set(keys)
    for key in keys:
        assert applications[key] == received[key], key
    # Each of the 60 events told to fail failed once, and no other: the failure row commits
    # with the attempt, so the plugin, which counts its event's rows, never sees an attempt
    # without its row.
    failed = sql("SELECT event_id, count(*) FROM delivery_failures GROUP BY event_id")
    assert dict(failed) == {event["id"]: 1 for event in events if event.get("fail")}
    # Different keys ran side by side: every worker applied some.
    assert len({pid for (pid,) in sql("SELECT DISTINCT pid FROM test_applied")}) == 3


def test_a_handler_sleeping_10_s_is_answered_at_once_and_applied_once_later(clean_db, sql):
    with (
        gunicorn(ASYNC_SOURCES, clean_db) as server,
        worker(ASYNC_SOURCES, clean_db, env=WORKER_ENV) as running,
    ):
        answer = signed_post(server.url, "queued", {"id": "slow", "sleep": 10})
        # Answered before the handler could have finished: nothing of it has committed.
        assert answer.status_code == 202 and answer.json()["status"] == "accepted"
        assert status_of(sql, "slow").status == "received" and applied(sql, "slow") == []
        wait_for(lambda: handler_running(sql, running.pid), "the worker's handler to run")
        # The provider's retry (it would have timed out waiting for a synchronous answer)
        # is answered at once too, while the handler still runs.
        retry = signed_post(server.url, "queued", {"id": "slow", "sleep": 10})
        assert retry.status_code == 202 and retry.json()["status"] == "accepted"
        assert applied(sql, "slow") == []
        wait_for(lambda: status_of(sql, "slow").status == "processed", "the slow event")
        running.wait_log("event_id=slow event_type=- outcome=processed")
        log = running.log()
    row = status_of(sql, "slow")
    assert (row.processed_at - row.received_at).total_seconds() >= 10  # it did sleep
    assert len(applied(sql, "slow")) == 1 and row.attempts == 0
    assert sql("SELECT duplicate_count FROM processed_events") == [(1,)]
    assert sql("SELECT count(*) FROM delivery_failures") == [(0,)]
    assert log.count("event_id=slow") == 1  # one attempt: no retry storm


def handler_running(sql, pid: int) -> bool:
    """Whether the handler of worker ``pid`` is running (it labels its session, sleeping)."""
    rows = sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = :name",
        name=f"{APPLICATION_NAME_PREFIX}{pid}",
    )
    return rows[0][0] > 0


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["clean stop", "crash"])
def test_a_database_restart_under_load_loses_nothing_and_applies_nothing_twice(own_cluster, mode):
    cluster, url = own_cluster
    engine = create_engine(url)
    ids = [f"load-{i}" for i in range(300)]
    pending = list(reversed(ids))
    lock = threading.Lock()
    accepted = 0
    enough = threading.Event()
    answered: dict[str, int] = {}

    def client() -> None:
        nonlocal accepted
        while True:
            with lock:
                if not pending:
                    return
                event_id = pending.pop()
            deadline = time.monotonic() + GUARD_SECONDS
            while time.monotonic() < deadline:  # retrying, as a provider does
                try:
                    answer = signed_post(
                        server.url, "queued", {"id": event_id, "sleep": 0.005}, timeout=10
                    )
                except requests.RequestException:
                    time.sleep(0.05)
                    continue
                if answer.status_code in (200, 202):
                    with lock:
                        answered[event_id] = answer.status_code
                        accepted += 1
                        if accepted == 60:
                            enough.set()
                    break
                assert answer.status_code == 503, answer.text
                time.sleep(0.05)

    def count(statement: str) -> int:
        try:
            with engine.connect() as conn:
                return conn.execute(text(statement)).scalar()
        except Exception:  # noqa: BLE001 (the database is down)
            return -1

    try:
        with (
            gunicorn(ASYNC_SOURCES, url) as server,
            worker(ASYNC_SOURCES, url, count=2, env=WORKER_ENV) as workers,
        ):
            clients = [threading.Thread(target=client) for _ in range(6)]
            for thread in clients:
                thread.start()
            assert enough.wait(GUARD_SECONDS)
            engine.dispose()
            cluster.stop(mode)
            for running in workers:
                wait_for(
                    lambda running=running: (
                        "unreachable" in running.log()
                        or "LISTEN connection was lost" in running.log()
                    ),
                    "every worker to notice the database is gone",
                )
            cluster.start()
            for thread in clients:
                thread.join(GUARD_SECONDS * 2)
            assert len(answered) == len(ids)
            wait_for(
                lambda: (
                    count("SELECT count(*) FROM processed_events WHERE status = 'processed'")
                    == len(ids)
                ),
                "every accepted event to be processed",
                timeout=120,
            )
            assert all(w.process.poll() is None for w in workers)  # the same processes
        with engine.connect() as conn:
            effects = dict(
                conn.execute(text("SELECT event_id, count(*) FROM test_applied GROUP BY 1")).all()
            )
    finally:
        engine.dispose()
    assert effects == {event_id: 1 for event_id in ids}  # nothing lost, nothing twice


def test_a_handler_past_the_worker_deadline_is_given_up_on_and_ends_failed(clean_db, sql):
    env = {**WORKER_ENV, "IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS": "1000"}
    with (
        gunicorn(ASYNC_SOURCES, clean_db) as server,
        worker(ASYNC_SOURCES, clean_db, env=env) as running,
    ):
        assert signed_post(server.url, "queued", {"id": "hung", "sleep": 600}).status_code == 202
        wait_for(lambda: status_of(sql, "hung").attempts == 1, "the first attempt to be given up")
        # The worker is not stuck behind it: a later event is applied meanwhile.
        assert signed_post(server.url, "queued", {"id": "next"}).status_code == 202
        wait_for(lambda: status_of(sql, "next").status == "processed", "the next event")
        wait_for(lambda: status_of(sql, "hung").status == "failed", "'hung' to end failed")
        running.wait_log("outcome=failed")
        log = running.log()
    row = status_of(sql, "hung")
    assert row.attempts == 3 and applied(sql, "hung") == []  # nothing of it ever committed
    errors = [e for (e,) in sql("SELECT error FROM delivery_failures ORDER BY id")]
    assert (
        errors
        == [
            "handlers raised TimeoutError: the handlers ran longer than "
            "IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS (1000 ms); the worker gave up on them and their "
            "transaction was rolled back"
        ]
        * 3
    )
    assert re.findall(r"event_id=hung \S+ outcome=(\w+)", log) == ["retry", "retry", "failed"]


def test_sigterm_lets_the_event_in_hand_finish_and_commit(clean_db, sql):
    with gunicorn(ASYNC_SOURCES, clean_db) as server:
        with worker(ASYNC_SOURCES, clean_db, env=WORKER_ENV) as running:
            assert signed_post(server.url, "queued", {"id": "term", "sleep": 1}).status_code == 202
            # The exact signal: this worker's handler has started (its session says so), so
            # the event is in hand, not merely taken.
            wait_for(lambda: handler_running(sql, running.pid), "the worker's handler to run")
            running.process.terminate()  # SIGTERM, as a deploy sends it
            assert running.process.wait(timeout=GUARD_SECONDS) == 0, running.log()
            log = running.log()
    assert status_of(sql, "term").status == "processed" and len(applied(sql, "term")) == 1
    assert "outcome=processed" in log and log.rstrip().endswith("stopped")
