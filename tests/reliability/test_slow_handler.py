"""A handler that outlives the statement/lock timeout fails cleanly and blocks nobody else."""

from __future__ import annotations

import threading

import psycopg2
import pytest
import requests

from app.testing import deliver
from app.testing.postgres import _connect_args
from tests.plugins.blocker import LOCK_KEY
from tests.reliability.conftest import FAULT_SOURCES, signed_post, wait_for
from tests.servers import gunicorn

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

# Long enough that the other deliveries finish while the slow one still waits.
TIMEOUT_MS = 3000


@pytest.fixture(scope="module")
def slow_server(pg_url):
    """Four workers whose statement and lock timeout is TIMEOUT_MS."""
    with gunicorn(
        FAULT_SOURCES, pg_url, workers=4, env={"IDEMHOOK_STATEMENT_TIMEOUT_MS": str(TIMEOUT_MS)}
    ) as server:
        yield server


def test_handler_waiting_past_the_lock_timeout_fails_cleanly_without_blocking_others(
    slow_server, clean_db, sql
):
    holder = psycopg2.connect(**_connect_args(clean_db))
    holder.autocommit = True
    answers: list[requests.Response] = []
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        slow = threading.Thread(
            target=lambda: answers.append(
                signed_post(slow_server.url, "blocking", {"id": "slow-1", "block": "lock"})
            )
        )
        slow.start()
        wait_for(
            lambda: sql(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event = 'advisory'"
            ),
            "the slow handler to wait on the lock",
        )
        # Other events on other workers go through while the slow one is stuck.
        others = [
            signed_post(slow_server.url, "acme", {"id": f"other-{i}", "type": "contact.new"})
            for i in range(3)
        ]
        still_waiting = slow.is_alive()
        slow.join(timeout=30)
    finally:
        holder.close()

    assert [o.json()["status"] for o in others] == ["processed"] * 3
    assert still_waiting, "the other deliveries should finish while the slow handler waits"
    [failed] = answers
    assert failed.status_code == 500
    assert failed.json()["error"] == "handler_failed"
    assert "OperationalError" in failed.json()["message"]
    # Failure recorded, claim released, the handler's effect rolled back.
    [failure] = sql("SELECT event_id, error FROM delivery_failures")
    assert failure.event_id == "slow-1"
    # Both bounds equal IDEMHOOK_STATEMENT_TIMEOUT_MS; whichever PostgreSQL checks first fires.
    assert "statement timeout" in failure.error or "lock timeout" in failure.error
    assert sql("SELECT event_id FROM processed_events ORDER BY 1") == [
        (f"other-{i}",) for i in range(3)
    ]
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'slow-1'")[0][0] == 0

    # The lock is gone: the provider's redelivery is applied, once.
    retried = signed_post(slow_server.url, "blocking", {"id": "slow-1", "block": "lock"})
    assert retried.status_code == 200 and retried.json()["status"] == "processed"
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'slow-1'")[0][0] == 1


def test_statement_past_the_statement_timeout_fails_cleanly(slow_server, clean_db, sql):
    answer = signed_post(
        slow_server.url, "blocking", {"id": "slow-2", "block": "sleep", "seconds": 30}
    )
    assert answer.status_code == 500 and answer.json()["error"] == "handler_failed"
    [failure] = sql("SELECT event_id, error FROM delivery_failures")
    assert failure.event_id == "slow-2" and "statement timeout" in failure.error
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 0
    # The worker's connection is healthy afterwards: every worker still processes events.
    for i in range(8):
        ok = signed_post(slow_server.url, "acme", {"id": f"after-{i}", "type": "contact.x"})
        assert ok.json()["status"] == "processed"


def test_duplicate_waiting_longer_than_the_lock_timeout_answers_503_then_duplicate(
    slow_server, clean_db, sql
):
    # The first delivery holds its claim (in Python, not SQL) for longer than the lock
    # timeout, so the duplicate's wait on the claim's row gives up first.
    event = {"id": "slow-3", "type": "contact.updated", "sleep": TIMEOUT_MS / 1000 + 2}
    answers: dict[str, requests.Response] = {}
    first = threading.Thread(
        target=lambda: answers.setdefault("first", signed_post(slow_server.url, "acme", event))
    )
    first.start()
    wait_for(
        lambda: sql(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'idemhook%' AND state = 'idle in transaction'"
        ),
        "the first delivery to hold its claim",
    )
    duplicate = signed_post(slow_server.url, "acme", event)
    first.join(timeout=30)

    assert duplicate.status_code == 503
    assert duplicate.json()["error"] == "event_in_progress"
    assert duplicate.headers["Retry-After"] == "1"
    assert answers["first"].status_code == 200 and answers["first"].json()["status"] == "processed"
    again = signed_post(slow_server.url, "acme", event)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 1
    assert sql("SELECT duplicate_count FROM processed_events")[0][0] == 1


def test_handler_stuck_in_python_past_the_idle_timeout_releases_its_claim(make_app, sql):
    # PostgreSQL ends a session idle in its transaction for 2x the timeout (at least 1 s).
    # The receiver cannot tell that from a restart: it retries once, then answers 503.
    app = make_app(IDEMHOOK_STATEMENT_TIMEOUT_MS=300)
    client = app.test_client()
    stuck = deliver(client, "acme", {"id": "py-slow", "type": "contact.x", "sleep": 1.2})
    assert stuck.status_code == 503 and stuck.json["error"] == "database_unavailable"
    assert stuck.headers["Retry-After"] == "1"
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 0
    # The next delivery gets a fresh connection and is processed.
    ok = deliver(client, "acme", {"id": "py-fast", "type": "contact.x"})
    assert ok.status_code == 200 and ok.json["status"] == "processed"
