"""Faults of ``idemhook worker`` that cost a user a duplicate send or a stalled queue.

Real ``idemhook worker`` processes (tests/servers.py) on the run's own PostgreSQL
database. The senders are ``tests.plugins.traced``, the handler
``tests.plugins.session_ender``: each call appends a line to a file of the test's
``tmp_path`` outside any transaction, so a send whose result was never recorded, or
a handler whose transaction was lost, still shows; a *held* send writes its line,
which is the test's exact signal that the send is running, and waits for the test
to release it.

- a send during which the worker's database session ends is recorded, not sent again;
- quick messages of a batch are recorded while a slow batch-mate still sends, so
  another worker never sends them again when their lease runs out;
- a worker killed in the middle of a send charges that message only, and the messages
  of its batch that it had not started are sent at once by the next worker;
- a received event whose handler ends the worker's database session ends ``failed``
  after :data:`idemhook._engine.applier.MAX_INTERRUPTIONS`, and the events behind it are applied.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL

from idemhook._engine.applier import MAX_INTERRUPTIONS
from idemhook._engine.outbox import add_message
from tests.conftest import SECRET, SOURCES
from tests.faults import sessions, terminate
from tests.plugins.traced import TRACE_ENV, calls, release
from tests.reliability.conftest import GUARD_SECONDS, signed_post, wait_for
from tests.servers import WorkerProcess, gunicorn, start_worker, toml, worker

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

#: The worker's pooled sessions (its LISTEN connection is ``idemhook-worker-listen``).
WORKER = "idemhook-worker"

#: The traced senders, on the test sources.
SENDERS: dict[str, Any] = {
    "plugins": [*SOURCES["plugins"], "tests.plugins.traced"],
    "sources": SOURCES["sources"],
}

#: What a user of the example in the issue set for a kind: two attempts, a 4 s lease.
FRAGILE_SENDERS: dict[str, Any] = {
    **SENDERS,
    "outbox": {"fragile": {"max_attempts": 2, "lease_seconds": 4}},
}

#: An asynchronous source whose handler can end its own database session.
DOOMED_SOURCES: dict[str, Any] = {
    "plugins": [*SOURCES["plugins"], "tests.plugins.session_ender"],
    "sources": {
        **SOURCES["sources"],
        "doomed": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "mode": "async",
            "max_attempts": 3,
            "backoff_seconds": 0.2,
            "max_backoff_seconds": 1,
        },
    },
}


def trace_env(directory: Path, **settings: str) -> dict[str, str]:
    """The worker's settings: where the plugin traces, and a quicker poll than 1 s."""
    return {TRACE_ENV: str(directory), "IDEMHOOK_WORKER_POLL_MS": "200", **settings}


def add(url: URL, kind: str, payloads: list[Any], prefix: str) -> list[int]:
    """Add messages in one committed transaction, as a handler's claim would; their ids."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            return [
                add_message(conn, kind, payload, f"{prefix}-{n}")
                for n, payload in enumerate(payloads)
            ]
    finally:
        engine.dispose()


def messages(sql, ids: list[int]) -> list[Any]:
    return sql(
        "SELECT id, key, status, attempts, last_error, result, sent_at, next_attempt_at "
        "FROM outbox_messages WHERE id = ANY(:ids) ORDER BY id",
        ids=ids,
    )


def tail(log: str, lines: int = 12) -> str:
    """The end of a worker's log, for an assertion's message."""
    return "\n".join(log.splitlines()[-lines:])


def settle(probe: Callable[[], Any], what: str, timeout: float) -> None:
    """Wait (bounded) for ``probe``; on the guard, go on: the assertions say what is wrong."""
    try:
        wait_for(probe, what, timeout=timeout)
    except pytest.fail.Exception:
        pass


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP has taken effect)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


@contextmanager
def released(directory: Path) -> Iterator[None]:
    """On the way out, release every held send, so no worker waits for its hold's guard.

    (Entered after the workers: it is left before they are stopped.)
    """
    try:
        yield
    finally:
        release(directory)


# -- 3: the worker's database session ends during a send --------------------------------------


@pytest.mark.parametrize("ending", ["terminated", "idle_session_timeout"])
def test_a_send_during_which_the_workers_session_ends_is_recorded_once_not_sent_again(
    clean_db, sql, tmp_path, ending
):
    [message_id] = add(clean_db, "held", [{"to": "ada@example.com"}], "session")
    env = trace_env(tmp_path)
    if ending == "idle_session_timeout":
        # The database ends any session idle for 1 s (libpq passes PGOPTIONS on).
        env["PGOPTIONS"] = "-c idle_session_timeout=1000"
    with worker(SENDERS, clean_db, env=env) as running, released(tmp_path):
        wait_for(lambda: calls(tmp_path), "the send to start")
        if ending == "terminated":  # a failover, a restart, an administrator
            pids = [s.pid for s in sessions(clean_db, WORKER)]
            assert terminate(clean_db, pids) >= 1, running.log()
            wait_for(
                lambda: not {s.pid for s in sessions(clean_db, WORKER)} & set(pids),
                "the worker's sessions to end",
            )
        else:
            wait_for(
                lambda: not sessions(clean_db, WORKER),
                "idle_session_timeout to end the worker's idle session",
            )
        release(tmp_path)  # the provider accepts the message now
        settle(
            lambda: messages(sql, [message_id])[0].status == "sent",
            "the message to be recorded sent",
            timeout=GUARD_SECONDS / 2,
        )
        log = running.log()
    [row] = messages(sql, [message_id])
    sends = [(c["pid"], c["attempt"]) for c in calls(tmp_path)]
    assert len(sends) == 1, (sends, tail(log))  # sent once: nobody died, nothing stalled
    assert (row.status, row.attempts, row.result) == ("sent", 1, {"sent": row.key}), tail(log)


# -- 4: quick results held while a slow batch-mate sends --------------------------------------


def test_quick_messages_are_recorded_sent_while_a_slow_batch_mate_sends_and_never_sent_again(
    clean_db, sql, tmp_path
):
    # One batch: five quick messages (lease 2 s), then a slow one of a kind this worker has
    # not sent yet (higher id: sent last).
    quick = add(clean_db, "quick", [{"n": n} for n in range(5)], "quick")
    [slow] = add(clean_db, "slow", [{"n": 5}], "slow")
    env = trace_env(tmp_path)
    with worker(SENDERS, clean_db, env=env) as first, released(tmp_path):
        wait_for(lambda: calls(tmp_path, kind="slow"), "the slow send to start")
        # The quick messages went first, in the same worker's batch.
        assert [c["id"] for c in calls(tmp_path, kind="quick", pid=first.pid)] == quick
        # A second worker, as any deployment runs: it takes whatever is due.
        with worker(SENDERS, clean_db, env=env) as second:
            settle(
                lambda: {r.status for r in messages(sql, quick)} == {"sent"},
                "the quick messages to be recorded sent while the slow one sends",
                timeout=GUARD_SECONDS / 2,
            )
            held = [(r.id, r.status) for r in messages(sql, quick)]
            release(tmp_path)  # the slow provider answers at last
            wait_for(
                lambda: messages(sql, [slow])[0].status == "sent", "the slow message to be sent"
            )
            logs = first.log() + second.log()
    assert held == [(message_id, "sent") for message_id in quick], tail(logs)
    sends = [c["id"] for c in calls(tmp_path)]
    every = [*quick, slow]
    assert {m: sends.count(m) for m in every} == dict.fromkeys(every, 1), tail(logs, 20)
    assert [(r.status, r.attempts) for r in messages(sql, [*quick, slow])] == [("sent", 1)] * 6


# -- 5: killed workers charge innocent batch-mates, the rest wait a full lease -----------------


def test_a_killed_worker_charges_only_the_message_it_was_sending_and_its_batch_goes_at_once(
    clean_db, sql, tmp_path
):
    config = tmp_path / "webhooks.toml"
    config.write_text(toml(FRAGILE_SENDERS))
    env = trace_env(tmp_path)

    def start(name: str) -> WorkerProcess:
        process = start_worker(config, clean_db, env=env, log_path=tmp_path / f"{name}.log")
        process.wait_log("listening on")
        return process

    started: list[WorkerProcess] = []
    try:
        # The replacement is up before anything is taken, then stopped (SIGSTOP) until its
        # predecessor dies: its start-up is no part of what the lease is compared with.
        standby = start("standby")
        started.append(standby)
        os.kill(standby.pid, signal.SIGSTOP)
        wait_for(lambda: stopped(standby.pid), "the standby worker to be stopped")

        # The poisoned message (its send never returns: the worker is killed in it) has the
        # lowest id: the nine others of its batch have not started when the worker dies.
        [poison] = add(clean_db, "fragile", [{"hang": True}], "poison")
        mates = add(clean_db, "fragile", [{"n": n} for n in range(9)], "mate")

        first = start("first")
        started.append(first)
        wait_for(lambda: calls(tmp_path, id=poison), "the poisoned send to start")
        first.kill()  # SIGKILL in the middle of the send, as the OOM killer would
        [killed] = messages(sql, [poison])
        lease_end = killed.next_attempt_at  # when the killed send's lease runs out

        os.kill(standby.pid, signal.SIGCONT)
        wait_for(lambda: len(calls(tmp_path, id=poison)) == 2, "the poisoned send to start again")
        standby.kill()  # killed again: its second and last allowed attempt

        last = start("last")
        started.append(last)
        settle(
            lambda: "pending" not in {r.status for r in messages(sql, [poison, *mates])},
            "every message to be sent or dead",
            timeout=GUARD_SECONDS / 2,
        )
        logs = "".join(w.log() for w in started)
    finally:
        release(tmp_path)
        for process in started:
            if process.process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.stop()

    sends = [c["id"] for c in calls(tmp_path)]
    rows = messages(sql, [poison, *mates])
    # The batch-mates the killed workers had not started: sent once each, never charged ...
    assert [(r.status, r.attempts, sends.count(r.id)) for r in rows[1:]] == [("sent", 1, 1)] * 9, (
        [(r.id, r.status, r.attempts, (r.last_error or "")[:40]) for r in rows],
        tail(logs),
    )
    # ... by the worker that replaced the first one, before the killed send's lease ran out.
    assert all(r.sent_at < lease_end for r in rows[1:]), ([r.sent_at for r in rows], lease_end)
    # The message in the middle of its send was charged for each killed send, and only those.
    assert sends.count(poison) == 2
    assert (rows[0].status, rows[0].attempts) == ("dead", 2), rows[0]
    assert "stopped" in rows[0].last_error, rows[0].last_error


# -- 6: a received event whose handler ends the worker's database session ----------------------


def test_an_event_that_ends_its_workers_session_fails_after_three_and_the_others_are_applied(
    clean_db, sql, tmp_path
):
    others = [f"after-{n}" for n in range(5)]
    with gunicorn(DOOMED_SOURCES, clean_db) as server:  # received first: taken first
        for event_id, end in [("doomed", True), *((e, False) for e in others)]:
            answer = signed_post(server.url, "doomed", {"id": event_id, "end_session": end})
            assert answer.status_code == 202, answer.text

    def state() -> dict[str, Any]:
        events = dict(sql("SELECT event_id, status FROM processed_events WHERE source = 'doomed'"))
        return {
            "doomed": events["doomed"],
            "others": {e: events[e] for e in others},
        }

    with worker(DOOMED_SOURCES, clean_db, env=trace_env(tmp_path)) as running:
        settle(
            lambda: state() == {"doomed": "failed", "others": dict.fromkeys(others, "processed")},
            "the doomed event to end failed and the five others to be applied",
            timeout=30,  # the fixed worker needs three quick takes
        )
        log = running.log()

    runs = calls(tmp_path, "run", event_id="doomed")
    failures = [e for (e,) in sql("SELECT error FROM delivery_failures WHERE event_id = 'doomed'")]
    applied = dict(sql("SELECT event_id, count(*) FROM test_applied GROUP BY event_id"))
    assert {
        **state(),
        "handler runs": len(runs),
        "failure rows": len(failures),
        "applied": applied,
    } == {
        "doomed": "failed",
        "others": dict.fromkeys(others, "processed"),
        "handler runs": MAX_INTERRUPTIONS,
        "failure rows": 1,
        "applied": dict.fromkeys(others, 1),
    }, tail(log)
    assert any(
        word in failures[0].lower() for word in ("session", "connection", "ended")
    ), failures
