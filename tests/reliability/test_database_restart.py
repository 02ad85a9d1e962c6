"""The test's own PostgreSQL cluster restarts while 4 workers take a load of deliveries."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from app.testing.postgres import Cluster, create_database, find_bindir
from tests.conftest import SOURCES, _migrate
from tests.reliability.conftest import GUARD_SECONDS, signed_post, wait_for
from tests.servers import gunicorn

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


@pytest.fixture
def own_cluster() -> Iterator[tuple[Cluster, URL]]:
    """A throwaway PostgreSQL cluster only this test restarts, with a migrated database."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail("the database restart test needs PostgreSQL's initdb and pg_ctl")
    cluster = Cluster(bindir).init().start()
    try:
        url = create_database(cluster.url)
        _migrate(url)
        yield cluster, url
    finally:
        cluster.destroy()


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
                time.sleep(0.05)

    with gunicorn(SOURCES, url, workers=4) as server:
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
