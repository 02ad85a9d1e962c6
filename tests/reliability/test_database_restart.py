"""The test's own PostgreSQL cluster restarts under the shipped gunicorn settings.

Under a load of deliveries (nothing lost, nothing applied twice), and while every
worker keeps several idle claim connections (the first delivery afterwards on
every worker answers 200).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg2
import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from idemhook.testing.postgres import connect_args
from tests.conftest import SOURCES
from tests.plugins.whoami import LOCK_KEY
from tests.reliability.conftest import GUARD_SECONDS, WHOAMI_SOURCES, signed_post, wait_for
from tests.servers import Server, gunicorn, pin_sessions

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

DISTINCT = 150
DUPLICATES = 50  # deliveries of already-sent IDs, like a provider's eager retries
CLIENTS = 8
RESTART_AFTER = 40  # 2xx answers before the database goes down


@dataclass
class Attempt:
    event_id: str
    started: float
    ended: float
    status: int | None  # None: no HTTP answer
    error: str | None


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["clean stop", "crash"])
def test_database_restart_under_load_loses_nothing_and_applies_nothing_twice(own_cluster, mode):
    cluster, url = own_cluster
    event_ids = [f"load-{i}" for i in range(DISTINCT)]
    plan = event_ids + event_ids[:: DISTINCT // DUPLICATES][:DUPLICATES]
    plan.sort(key=lambda e: (hash(e) % 7, e))  # interleave duplicates with first deliveries
    queue = list(reversed(plan))
    attempts: list[Attempt] = []
    lock = threading.Lock()
    enough = threading.Event()
    ok_answers = 0

    def attempt(base: str, event_id: str) -> Attempt:
        started = time.monotonic()
        try:
            answer = signed_post(base, "acme", {"id": event_id, "type": "contact.updated"})
            status, error = answer.status_code, answer.json().get("error")
        except requests.RequestException as exc:
            status, error = None, type(exc).__name__
        return Attempt(event_id, started, time.monotonic(), status, error)

    def client(base: str) -> None:
        nonlocal ok_answers
        while True:
            with lock:
                if not queue:
                    return
                event_id = queue.pop()
            # A provider: redeliver every non-2xx until it gets a 2xx.
            deadline = time.monotonic() + GUARD_SECONDS
            while time.monotonic() < deadline:
                result = attempt(base, event_id)
                with lock:
                    attempts.append(result)
                    if result.status is not None and 200 <= result.status < 300:
                        ok_answers += 1
                        if ok_answers >= RESTART_AFTER:
                            enough.set()
                        break
                time.sleep(0.05)  # the provider's pause between redeliveries (not a wait)

    with gunicorn(SOURCES, url) as server:
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        assert enough.wait(GUARD_SECONDS)
        workers = sorted(server.worker_pids())

        # "immediate" is a crash: sessions are cut and startup runs WAL recovery.
        cluster.stop(mode)
        down_from = time.monotonic()
        # While the database is down: 503 with the stable code, never a 2xx.
        probes = [attempt(server.url, f"probe-{i}") for i in range(3)]
        with lock:
            attempts.extend(probes)
        for probe in probes:
            assert (probe.status, probe.error) == (503, "database_unavailable")
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 503
        wait_for(
            lambda: any(a.started > down_from and a.status == 503 for a in list(attempts)[-50:]),
            "the load to meet the outage",
        )
        down_until = time.monotonic()
        cluster.start()

        # Recovery without restarting the receiver: the same workers answer 2xx again.
        wait_for(
            lambda: requests.get(f"{server.url}/readyz", timeout=10).status_code == 200,
            "the receiver to become ready again",
        )
        for thread in threads:
            thread.join(GUARD_SECONDS)
            assert not thread.is_alive()
        assert sorted(server.worker_pids()) == workers  # recovered without a restart
        # The provider redelivers the probes that got 503 too.
        for i in range(3):
            assert signed_post(server.url, "acme", {"id": f"probe-{i}", "type": "contact.x"}).ok

    during_outage = [a for a in attempts if a.started > down_from and a.ended < down_until]
    assert during_outage and all(a.status == 503 for a in during_outage)
    assert all(a.status in (200, 503) for a in attempts), {a.status for a in attempts}
    assert sum(1 for a in attempts if a.status == 503) >= len(probes)

    engine = create_engine(url)
    with engine.connect() as conn:
        effects = dict(
            conn.execute(text("SELECT event_id, count(*) FROM test_effects GROUP BY 1")).all()
        )
        claimed = set(conn.execute(text("SELECT event_id FROM processed_events")).scalars())
    engine.dispose()
    answered_2xx = {a.event_id for a in attempts if a.status == 200}
    expected = set(event_ids) | {f"probe-{i}" for i in range(3)}
    assert answered_2xx == expected - {f"probe-{i}" for i in range(3)}
    assert effects == dict.fromkeys(expected, 1)  # every event exactly once, none lost
    assert claimed == expected


def _sql(url: URL, statement: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(statement)).all()
    finally:
        engine.dispose()


#: Claims waiting for the whoami handler's lock.
WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
)


def keep_connections(server: Server, url: URL) -> dict[int, set[int]]:
    """Make every worker run as many claims at once as it has threads; return what it keeps.

    Each worker is then left holding one idle claim connection ("lane") per
    thread. The result maps each worker's pid to the PostgreSQL backends of its
    connections that are idle now, as pg_stat_activity shows them.
    """
    workers = server.worker_pids()
    backends: dict[int, set[int]] = defaultdict(set)

    def ask(session: requests.Session) -> int:
        answer = signed_post(server.url, "whoami", {"id": f"pin-{uuid.uuid4()}"}, session=session)
        result = answer.json()["result"]
        backends[result["worker"]].add(result["backend"])
        return result["worker"]

    pinned = pin_sessions(server, server.threads, ask)

    # Every claim waits for the lock the test holds, so all of them are open at once,
    # each on a connection of its own.
    holder = psycopg2.connect(**connect_args(url))
    holder.autocommit = True

    def waiting() -> int:
        with holder.cursor() as cur:
            cur.execute(WAITING)
            return cur.fetchone()[0]

    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        sends = [(w, s) for w in workers for s in pinned[w]]
        with ThreadPoolExecutor(len(sends)) as pool:
            futures = [
                pool.submit(
                    signed_post, server.url, "whoami", {"id": f"busy-{i}", "wait": True}, session=s
                )
                for i, (_, s) in enumerate(sends)
            ]
            wait_for(
                lambda: waiting() == len(sends), "every thread of every worker to hold a claim open"
            )
            with holder.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            answers = [f.result() for f in futures]
    finally:
        holder.close()
        for session in (s for sessions in pinned.values() for s in sessions):
            session.close()
    for (worker, _), answer in zip(sends, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["worker"] == worker  # the connection stayed pinned
        backends[worker].add(answer.json()["result"]["backend"])

    idle = {
        pid
        for (pid,) in _sql(
            url,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'idemhook-web' AND state = 'idle'",
        )
    }
    return {worker: backends[worker] & idle for worker in workers}


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["clean stop", "crash"])
def test_first_delivery_on_every_worker_after_a_restart_answers_200(own_cluster, mode):
    cluster, url = own_cluster
    # The claims of keep_connections wait on the test's lock: the shipped 2 s lock
    # timeout must not end that wait on a busy machine (it plays no part in a restart).
    with gunicorn(WHOAMI_SOURCES, url, env={"IDEMHOOK_STATEMENT_TIMEOUT_MS": "60000"}) as server:
        workers = server.worker_pids()
        assert len(workers) == server.workers >= 2 and server.threads >= 3
        kept = keep_connections(server, url)
        assert {w: len(b) >= 3 for w, b in kept.items()} == dict.fromkeys(workers, True), kept

        # Nothing touches the database between the restart and the deliveries (no
        # /readyz): each worker's first claim afterwards meets its dead kept connections.
        cluster.stop(mode)
        cluster.start()

        # Deliveries one at a time, each on a new HTTP connection, until every worker
        # has answered one; the handler's result says which worker answered.
        answers: list[requests.Response] = []
        answered: set[int] = set()
        deadline = time.monotonic() + GUARD_SECONDS
        while answered != set(workers):
            assert time.monotonic() < deadline, f"only workers {answered} answered"
            answer = signed_post(server.url, "whoami", {"id": f"after-{len(answers)}"})
            answers.append(answer)
            assert answer.status_code == 200, (len(answers), answer.text)
            answered.add(answer.json()["result"]["worker"])
        assert server.worker_pids() == workers  # recovered without restarting a worker

    assert {a.json()["status"] for a in answers} == {"processed"}
    # Every answer came from a fresh connection, none from a kept one that died.
    before = set().union(*kept.values())
    assert not {a.json()["result"]["backend"] for a in answers} & before
    claimed = {e for (e,) in _sql(url, "SELECT event_id FROM processed_events")}
    assert {f"after-{i}" for i in range(len(answers))} <= claimed
