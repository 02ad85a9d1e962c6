"""Simultaneous duplicates on gunicorn's threads and workers apply the effect exactly once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from idemhook import create_app
from idemhook.testing.kit import signed
from tests.conftest import SOURCES
from tests.servers import gunicorn

pytestmark = pytest.mark.gunicorn

DELIVERIES = 50
EVENTS = 20


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, pg_url, sqlite_url):
    """PostgreSQL (production) and SQLite (demo: one writer at a time, same outcome)."""
    return pg_url if request.param == "postgresql" else sqlite_url


def post_together(barrier, url, body, headers) -> requests.Response:
    barrier.wait()
    return requests.post(url, data=body, headers=headers, timeout=30)


def test_concurrent_duplicates_across_workers_apply_once(db_url, sql, make_app):
    make_app()  # empties the tables afterwards
    # Sign with an in-process app built from the same sources as the server.
    signer = create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": SOURCES})
    with gunicorn(SOURCES, db_url) as server:  # the shipped settings: 2 workers x 4 threads
        assert server.workers >= 2 and server.threads >= 2
        for n in range(EVENTS):
            # The handler holds its transaction briefly so that the duplicates really
            # arrive while the first delivery is still in flight.
            _, body, headers = signed(
                signer, "acme", {"id": f"storm-{n}", "type": "contact.updated", "sleep": 0.05}
            )
            barrier = threading.Barrier(DELIVERIES)
            with ThreadPoolExecutor(DELIVERIES) as pool:
                futures = [
                    pool.submit(
                        post_together, barrier, f"{server.url}/webhooks/acme", body, headers
                    )
                    for _ in range(DELIVERIES)
                ]
                responses = [f.result() for f in futures]

            assert [r.status_code for r in responses] == [200] * DELIVERIES
            statuses = sorted(r.json()["status"] for r in responses)
            assert statuses == ["duplicate"] * (DELIVERIES - 1) + ["processed"]
            assert {r.json()["result"]["applied"] for r in responses} == {f"storm-{n}"}

    rows = sql("SELECT event_id, count(*) FROM test_effects GROUP BY event_id")
    assert dict(rows) == {f"storm-{n}": 1 for n in range(EVENTS)}
    counts = sql("SELECT event_id, duplicate_count FROM processed_events")
    assert dict(counts) == {f"storm-{n}": DELIVERIES - 1 for n in range(EVENTS)}
    signer.extensions["idemhook.db"].engine.dispose()
