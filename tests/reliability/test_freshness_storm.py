"""Freshness under real concurrency: out-of-order updates never overwrite newer data.

20 objects x 50 versions, every event delivered twice, shuffled, by 8 concurrent
clients, to the shipped gunicorn (and, for an asynchronous source, applied by 3 real
``idemhook worker`` processes). The handlers (``tests.plugins.versioned``) overwrite
their row with whatever they are sent and log every run with a sequence number drawn
while the event holds its object's lock, so the log of one object, in that order, is
the order its runs committed.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from idemhook.testing.postgres import connect_args
from tests.conftest import SECRET
from tests.reliability.conftest import GUARD_SECONDS, signed_post, wait_for
from tests.servers import gunicorn, worker

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

OBJECTS = 20
VERSIONS = 50
CLIENTS = 8
FRESHNESS = {"object": "body:object", "version": "body:version"}
SOURCE = {
    "scheme": "hmac-sha256",
    "secret": SECRET,
    "event_id": "body:id",
    "event_type": "body:type",
    "freshness": FRESHNESS,
}
SOURCES = {
    "plugins": ["tests.plugins.versioned"],
    "sources": {
        "versioned": SOURCE,
        "versioned_batch": {**SOURCE, "batch": "array"},
        "audited": SOURCE,
        "versioned_async": {
            **SOURCE,
            "mode": "async",
            "backoff_seconds": 0.2,
            "max_backoff_seconds": 1,
        },
    },
}
#: A quicker poll than the default second (the fallback; NOTIFY wakes the workers).
WORKER_ENV = {"IDEMHOOK_WORKER_POLL_MS": "200"}


def deliveries(seed: int) -> list[dict]:
    """Every event of every object, twice, in a shuffled order."""
    sent = events() * 2
    random.Random(seed).shuffle(sent)
    return sent


def events() -> list[dict]:
    return [
        {
            "id": f"o{o}-v{v}",
            "type": "contact.updated",
            "object": f"o{o}",
            "version": v,
            "data": f"o{o} at version {v}",
        }
        for o in range(OBJECTS)
        for v in range(1, VERSIONS + 1)
    ]


def check_outcome(sql, source: str) -> Counter:
    """What a user would check: newest data everywhere, nothing older after newer, counts."""
    # Each object ends at its newest version's data.
    assert sql(
        "SELECT object_key, version, event_id, data FROM test_objects WHERE source = :s "
        "ORDER BY object_key",
        s=source,
    ) == [
        (f"o{o}", VERSIONS, f"o{o}-v{VERSIONS}", f"o{o} at version {VERSIONS}")
        for o in sorted(range(OBJECTS), key=lambda o: f"o{o}")
    ]
    assert sql(
        "SELECT count(*) FROM object_versions WHERE source = :s AND version = :v",
        s=source,
        v=VERSIONS,
    ) == [(OBJECTS,)]
    # No handler ever ran for an event older than one already applied to its object: per
    # object, in commit order, the versions only grow.
    runs: dict[str, list[int]] = {}
    for object_key, version in sql(
        "SELECT object_key, version FROM test_object_log WHERE source = :s ORDER BY n", s=source
    ):
        runs.setdefault(object_key, []).append(int(version))
    assert len(runs) == OBJECTS
    for object_key, versions in runs.items():
        assert all(a < b for a, b in zip(versions, versions[1:], strict=False)), (
            object_key,
            versions,
        )
    # Processed + stale = the distinct events; each processed event's handler ran once.
    statuses = Counter(
        dict(
            sql(
                "SELECT status, count(*) FROM processed_events WHERE source = :s GROUP BY 1",
                s=source,
            )
        )
    )
    assert set(statuses) <= {"processed", "stale"}, statuses
    assert statuses["processed"] + statuses["stale"] == OBJECTS * VERSIONS
    assert sum(len(v) for v in runs.values()) == statuses["processed"]
    assert sql(
        "SELECT count(*) FROM test_object_log l JOIN processed_events e ON e.source = l.source "
        "AND e.event_id = l.event_id AND e.status = 'processed' WHERE l.source = :s",
        s=source,
    ) == [(statuses["processed"],)]
    # Every stale event names an applied event of its object at least as new.
    bad = sql(
        "SELECT s.event_id FROM processed_events s JOIN processed_events n "
        "ON n.source = s.source AND n.event_id = s.result->>'newer' "
        "WHERE s.source = :s AND s.status = 'stale' AND NOT ("
        "n.status = 'processed' AND n.payload->>'object' = s.payload->>'object' "
        "AND (n.payload->>'version')::int >= (s.payload->>'version')::int)",
        s=source,
    )
    assert bad == []
    assert sql("SELECT count(*) FROM delivery_failures") == [(0,)]
    return statuses


def test_out_of_order_concurrent_updates_end_at_the_newest_version_on_gunicorn(clean_db, sql):
    sent = deliveries(seed=24)
    with gunicorn(SOURCES, clean_db) as server:
        assert server.workers >= 2 and server.threads >= 2  # races inside and across workers
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            answers = list(pool.map(lambda e: signed_post(server.url, "versioned", e), sent))

    assert Counter(a.status_code for a in answers) == {200: len(sent)}
    said = Counter(a.json()["status"] for a in answers)
    assert set(said) <= {"processed", "stale", "duplicate"}, said
    statuses = check_outcome(sql, "versioned")
    # Each distinct event was answered processed or stale once, and duplicate once.
    assert said["duplicate"] == OBJECTS * VERSIONS
    assert said["processed"] == statuses["processed"] and said["stale"] == statuses["stale"]
    for answer in answers:
        body = answer.json()
        if body["status"] == "stale":
            assert body["newer"].split("-")[0] == body["event_id"].split("-")[0]


def test_out_of_order_concurrent_updates_end_at_the_newest_version_with_3_workers(
    clean_db, sql
):
    sent = deliveries(seed=42)
    with (
        gunicorn(SOURCES, clean_db) as server,
        worker(SOURCES, clean_db, count=3, env=WORKER_ENV),
    ):
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            answers = list(
                pool.map(lambda e: signed_post(server.url, "versioned_async", e), sent)
            )
        wait_for(
            lambda: sql(
                "SELECT count(*) FROM processed_events WHERE source = 'versioned_async' "
                "AND status IN ('processed', 'stale')"
            )[0][0]
            == OBJECTS * VERSIONS,
            "every event to be applied or found stale by the workers",
        )

    codes = Counter(a.status_code for a in answers)
    assert set(codes) <= {200, 202} and codes[202] >= OBJECTS * VERSIONS, codes
    check_outcome(sql, "versioned_async")
    assert sql("SELECT count(*) FROM event_queue") == [(0,)]


def test_batches_sharing_objects_and_events_never_deadlock_and_end_at_the_newest_version(
    clean_db, sql
):
    # Every event in two batches of 5, each time beside other events, many of them of the
    # same objects: a batch holds its objects while it claims its next events, which
    # another batch may be claiming too (the deadlock the object locks and order prevent).
    rng = random.Random(7)
    batches = []
    for _copy in range(2):
        shuffled = events()
        rng.shuffle(shuffled)
        batches += [shuffled[i : i + 5] for i in range(0, len(shuffled), 5)]
    rng.shuffle(batches)
    with gunicorn(SOURCES, clean_db) as server:
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            answers = list(
                pool.map(lambda b: signed_post(server.url, "versioned_batch", b), batches)
            )

    assert Counter(a.status_code for a in answers) == {200: len(batches)}, [
        a.json() for a in answers if a.status_code != 200
    ][:3]
    said = Counter(e["status"] for a in answers for e in a.json()["events"])
    assert set(said) <= {"processed", "stale", "duplicate"}, said
    statuses = check_outcome(sql, "versioned_batch")
    assert said["duplicate"] == OBJECTS * VERSIONS
    assert said["processed"] == statuses["processed"] and said["stale"] == statuses["stale"]


def test_an_old_event_checked_while_its_object_is_pruned_does_not_apply(clean_db):
    # The check's snapshot predates the floor; its insert lands after the row is deleted:
    # it must see the floor then and take its row back (the function's re-check).
    def connect():
        conn = psycopg2.connect(**connect_args(clean_db))
        conn.autocommit = True
        return conn

    setup, deleter, checker, floor = connect(), connect(), connect(), connect()
    try:
        with setup.cursor() as cur:
            cur.execute(
                "INSERT INTO object_versions VALUES ('versioned', 'A', 9, 'e9', now())"
            )
        deleting = deleter.cursor()
        deleting.execute("BEGIN; DELETE FROM object_versions WHERE object_key = 'A'")
        with checker.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            [checker_pid] = cur.fetchone()
        found: list = []
        thread = threading.Thread(
            target=lambda: found.append(_apply(checker, "A", 5, "e5")), daemon=True
        )
        thread.start()
        # The check waits on the row being deleted: its snapshot has no floor yet.
        wait_for(lambda: _waits_on_a_lock(setup, checker_pid), "the check to wait on the row")
        with floor.cursor() as cur:
            cur.execute(
                "INSERT INTO object_version_floors VALUES ('versioned', 9, 'e9', now())"
            )
        deleting.execute("COMMIT")
        thread.join(GUARD_SECONDS)
        assert found == ["e9"]  # stale: the floor's event is newer
        with setup.cursor() as cur:
            cur.execute("SELECT count(*) FROM object_versions WHERE object_key = 'A'")
            assert cur.fetchone() == (0,)
    finally:
        for conn in (setup, deleter, checker, floor):
            conn.close()


def _apply(conn, object_key: str, version: int, event_id: str):
    with conn.cursor() as cur:
        cur.execute(
            "SELECT idemhook_apply_version('versioned', %s, %s, %s)",
            (object_key, version, event_id),
        )
        return cur.fetchone()[0]


def _waits_on_a_lock(conn, pid: int) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cur.fetchone()
    return row is not None and row[0] == "Lock"
