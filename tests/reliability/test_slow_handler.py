"""A handler that outlives the statement/lock timeout fails cleanly and blocks nobody else."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import psycopg2
import pytest
import requests

from idemhook.testing.postgres import connect_args
from tests.conftest import SECRET
from tests.plugins.blocker import LOCK_KEY
from tests.reliability.conftest import FAULT_SOURCES, GUARD_SECONDS, signed_post, wait_for
from tests.servers import gunicorn

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

# Long enough that the other deliveries finish while the slow one still waits.
TIMEOUT_MS = 3000


@pytest.fixture(scope="module")
def slow_server(pg_url):
    """The shipped gunicorn settings with a statement and lock timeout of TIMEOUT_MS."""
    with gunicorn(
        FAULT_SOURCES, pg_url, env={"IDEMHOOK_STATEMENT_TIMEOUT_MS": str(TIMEOUT_MS)}
    ) as server:
        yield server


def test_handler_waiting_past_the_lock_timeout_fails_cleanly_without_blocking_others(
    slow_server, clean_db, sql
):
    holder = psycopg2.connect(**connect_args(clean_db))
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
        # Other events go through (on the other threads and workers) while the slow one is
        # stuck.
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
    # The connection whose statement was cancelled stays usable: the receiver goes on
    # processing events (a worker reuses its most recently used claim connection first).
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


OUTSIDE_SOURCES = {
    "plugins": [*FAULT_SOURCES["plugins"], "tests.plugins.outside"],
    "sources": {
        **FAULT_SOURCES["sources"],
        "outside": {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"},
    },
}
#: The statement timeout of the never-twice tests; the handler sleeps 3 x this long.
NEVER_TWICE_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def outside_server(pg_url):
    """The shipped gunicorn settings with a 1 s statement timeout (handler timeout: 2 s)."""
    with gunicorn(
        OUTSIDE_SOURCES,
        pg_url,
        env={"IDEMHOOK_STATEMENT_TIMEOUT_MS": str(NEVER_TWICE_TIMEOUT_MS)},
    ) as server:
        yield server


def _attempt(server, payload, attempt):
    body = json.dumps(payload).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    started = time.monotonic()
    answer = requests.post(
        f"{server.url}/webhooks/outside",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Signature": f"sha256={signature}",
            "X-Attempt": str(attempt),
        },
        timeout=GUARD_SECONDS,
    )
    return answer, time.monotonic() - started


def _redeliver_until_applied(server, payload, first_attempt):
    """Redeliver like a provider: every non-2xx is retried, until one is answered 2xx."""
    attempt = first_attempt
    deadline = time.monotonic() + GUARD_SECONDS
    while time.monotonic() < deadline:
        attempt += 1
        answer, _ = _attempt(server, payload, attempt)
        if answer.ok:
            return answer, attempt
    pytest.fail("the provider's retries were never applied")


def test_handler_busy_in_python_past_the_timeouts_runs_once_per_request(
    outside_server, clean_db, sql, tmp_path
):
    # The handler's last SQL comes first, then 3 s in Python (an e-mail API that hangs):
    # three times the statement timeout, longer than the handler timeout (2 x) and than
    # PostgreSQL's idle-in-transaction timeout, which ends the session under it.
    calls = tmp_path / "calls.txt"
    payload = {"id": "py-slow", "file": str(calls), "sleep": 3 * NEVER_TWICE_TIMEOUT_MS / 1000}
    first, seconds = _attempt(outside_server, payload, 1)

    assert first.status_code in (200, 503), first.text
    if first.status_code == 503:
        assert first.json()["error"] == "handler_timeout"
        assert first.headers["Retry-After"] == "1"
    # Answered before the provider's own deadline, not after the handler finished.
    assert seconds < 2.5 * NEVER_TWICE_TIMEOUT_MS / 1000
    # The overrun is on record for the on-call engineer.
    [failure] = sql("SELECT event_id, error FROM delivery_failures")
    assert failure.event_id == "py-slow" and "IDEMHOOK_HANDLER_TIMEOUT_MS" in failure.error

    retried, last_attempt = _redeliver_until_applied(outside_server, payload, 1)
    assert retried.json()["status"] in ("processed", "duplicate")
    wait_for(lambda: calls.read_text().count("\n") >= 2, "the retry's outside call")
    lines = calls.read_text().split()
    # The outside effect ran at most once per request, and exactly once for the first.
    assert len(lines) == len(set(lines)) and lines[0] == "1"
    assert set(lines) <= {str(n) for n in range(1, last_attempt + 1)}
    # The database effect was applied once, with its claim.
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'py-slow'")[0][0] == 1
    assert sql("SELECT status FROM processed_events WHERE event_id = 'py-slow'") == [
        ("processed",)
    ]


def test_connection_lost_while_a_handler_runs_is_answered_503_without_running_it_again(
    outside_server, clean_db, sql, tmp_path
):
    # The handler's own session is ended under it (as a failover or a killed backend
    # would): before this issue the claim took that for a stale connection and ran the
    # handler a second time in the same request.
    calls = tmp_path / "calls.txt"
    payload = {"id": "killed", "file": str(calls), "kill": True}
    first, _ = _attempt(outside_server, payload, 1)

    assert first.status_code == 503, first.text
    assert first.json()["error"] == "database_unavailable"
    assert calls.read_text().split() == ["1"]
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0

    retried, _ = _redeliver_until_applied(outside_server, payload, 1)
    assert retried.json()["status"] == "processed"
    assert calls.read_text().split() == ["1", "2"]
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'killed'")[0][0] == 1
