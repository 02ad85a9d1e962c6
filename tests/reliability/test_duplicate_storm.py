"""200 concurrent deliveries of 10 event IDs on the shipped gunicorn settings (gthread)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import SOURCES
from tests.reliability.conftest import signed_post
from tests.servers import gunicorn

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

IDS = [f"storm-{i}" for i in range(10)]
DELIVERIES = 200


def test_duplicate_storm_applies_each_event_once_and_answers_every_delivery(clean_db, sql):
    # Each handler holds its transaction briefly so that duplicates really collide.
    payloads = [
        {"id": IDS[i % len(IDS)], "type": "contact.updated", "sleep": 0.01}
        for i in range(DELIVERIES)
    ]
    with gunicorn(SOURCES, clean_db) as server:
        # Duplicates race between the threads of one worker and between workers.
        assert server.settings["worker_class"] == "gthread"
        assert len(server.worker_pids()) == server.workers >= 2 and server.threads >= 2
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(lambda p: signed_post(server.url, "acme", p), payloads))

    assert len(answers) == DELIVERIES
    assert Counter(a.status_code for a in answers) == {200: DELIVERIES}
    statuses = Counter(a.json()["status"] for a in answers)
    assert statuses == {"processed": len(IDS), "duplicate": DELIVERIES - len(IDS)}
    # Every answer for an ID, first or duplicate, carries the same stored result.
    assert all(a.json()["result"] == {"applied": a.json()["event_id"]} for a in answers)

    assert sql("SELECT event_id, count(*) FROM test_effects GROUP BY 1 ORDER BY 1") == [
        (event_id, 1) for event_id in sorted(IDS)
    ]
    assert sql("SELECT sum(duplicate_count), count(*) FROM processed_events")[0] == (
        DELIVERIES - len(IDS),
        len(IDS),
    )
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == 0
