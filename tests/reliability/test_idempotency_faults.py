"""idempotency-key operations under real gunicorn when the key's row is lost under them.

- The app's connection is cut (a TCP proxy resets it) while PostgreSQL is inside the
  operation's COMMIT: the operation has committed, or it has not; either way the key's
  one effect is all there ever is, and the client's retry gets the operation's answer.
- The key's row vanishes while its operation runs (an operator deletes it to "free" a
  key): the operation must not commit, or the client's retry runs it a second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import psycopg2
import pytest
import requests
from sqlalchemy.engine import URL

from idemhook import create_app
from idemhook.testing import signed
from idemhook.testing.postgres import connect_args
from tests.faults import Proxy, sessions
from tests.plugins import held_operation
from tests.reliability.conftest import GUARD_SECONDS, wait_for
from tests.servers import gunicorn
from tests.test_operations import API_SOURCES

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

#: The web app's sessions in pg_stat_activity (this run's database only).
WEB = "idemhook-web"

HELD_SOURCES = {
    "plugins": [*API_SOURCES["plugins"], "tests.plugins.held_operation"],
    "sources": {
        **API_SOURCES["sources"],
        "held": {"scheme": "idempotency-key", "secret": "held-signing-secret", "path": "/v1/held"},
    },
}

#: A COMMIT that takes a moment, as synchronous replication or a slow disk makes it: a
#: deferred constraint trigger on the operation's effects sleeps 1 s at COMMIT.
SLOW_COMMIT = (
    "CREATE FUNCTION idemhook_test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER idemhook_test_slow_commit AFTER INSERT ON test_effects "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION idemhook_test_slow_commit()",
)
NO_SLOW_COMMIT = (
    "DROP TRIGGER IF EXISTS idemhook_test_slow_commit ON test_effects",
    "DROP FUNCTION IF EXISTS idemhook_test_slow_commit()",
)


@pytest.fixture
def slow_commit(clean_db: URL, sql) -> Iterator[URL]:
    """The test database, where every COMMIT that added a test_effects row sleeps 1 s."""
    for statement in SLOW_COMMIT:
        sql(statement)
    try:
        yield clean_db
    finally:
        for statement in NO_SLOW_COMMIT:
            sql(statement)


@pytest.fixture
def signer(clean_db: URL) -> Iterator:
    """An app that signs requests as the servers' sources expect."""
    app = create_app({"DATABASE_URL": clean_db, "IDEMHOOK_CONFIG": HELD_SOURCES})
    yield app
    app.extensions["idemhook.db"].engine.dispose()


def must_retry(answer: requests.Response) -> bool:
    """What the documented client retries with the same key: 409 (in flight) and 5xx."""
    return answer.status_code == 409 or answer.status_code >= 500


def retry_until_answered(send) -> requests.Response:
    """The client's retries with the same key (docs/idempotency-keys.md), until answered."""
    return wait_for(
        lambda: (answer if not must_retry(answer := send()) else None),
        "an answer to the retries that is neither 409 nor 5xx",
    )


def effects(sql, source: str, event_id: str) -> int:
    query = "SELECT count(*) FROM test_effects WHERE source = :s AND event_id = :e"
    return sql(query, s=source, e=event_id)[0][0]


def test_a_key_operation_whose_connection_is_cut_during_commit_is_applied_once(
    slow_commit, signer, sql
):
    db = slow_commit
    with (
        Proxy(db.host, db.port) as proxy,
        gunicorn(HELD_SOURCES, proxy.url(db)) as server,
        ThreadPoolExecutor(1) as client,
    ):
        url, body, headers = signed(
            signer, "charges", {"amount": 100}, base_url=server.url, key="cut-in-commit"
        )

        def send() -> requests.Response:
            return requests.post(url, data=body, headers=headers, timeout=GUARD_SECONDS)

        first_sent = client.submit(send)
        # PostgreSQL runs the operation's COMMIT (the deferred trigger sleeps in it) ...
        wait_for(
            lambda: [s for s in sessions(db, WEB) if s.wait_event == "PgSleep"],
            "the operation's COMMIT to run its deferred trigger",
        )
        # ... when the app's connection is reset: the COMMIT goes on without it.
        assert proxy.cut() >= 1
        first = first_sent.result()
        final = retry_until_answered(send) if must_retry(first) else first

    assert effects(sql, "charges", "cut-in-commit") == 1, (
        f"the operation ran more than once for one key (first answer {first.status_code} "
        f"{first.text.strip()}, final {final.status_code} {final.text.strip()})"
    )
    # The operation committed: its own answer, or a 503 whose retry gets it replayed.
    assert first.status_code in (201, 503), first.text
    if first.status_code == 503:
        assert first.json()["error"] == "database_unavailable"
        assert final.headers.get("Idempotent-Replayed") == "true"
    assert (final.status_code, final.json()) == (201, {"id": 1, "client": None, "to": None})
    [row] = sql(
        "SELECT status, response_status FROM processed_events "
        "WHERE source = 'charges' AND event_id = 'cut-in-commit'"
    )
    assert (row.status, row.response_status) == ("processed", 201)


def test_a_key_operation_whose_key_row_is_deleted_in_flight_does_not_commit(
    clean_db, signer, sql
):
    # Generous timeouts, only so that nothing but the test's cue ends the operation's wait.
    guard = {"IDEMHOOK_STATEMENT_TIMEOUT_MS": "20000"}
    with (
        gunicorn(HELD_SOURCES, clean_db, env=guard) as server,
        ThreadPoolExecutor(1) as client,
        # Closed first on the way out: the operation never waits on a failed test.
        closing(psycopg2.connect(**connect_args(clean_db))) as holder,
    ):
        holder.autocommit = True
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (held_operation.LOCK_KEY,))
        url, body, headers = signed(
            signer, "held", {"amount": 100}, base_url=server.url, key="deleted-in-flight"
        )

        def send() -> requests.Response:
            return requests.post(url, data=body, headers=headers, timeout=GUARD_SECONDS)

        first_sent = client.submit(send)
        wait_for(
            lambda: [s for s in sessions(clean_db, WEB) if s.wait_event == "advisory"],
            "the operation to wait in flight",
        )
        # An operator deletes the key's row while its operation runs (to "free" the key).
        with holder.cursor() as cur:
            cur.execute(
                "DELETE FROM processed_events "
                "WHERE source = 'held' AND event_id = 'deleted-in-flight'"
            )
            assert cur.rowcount == 1
            cur.execute("SELECT pg_advisory_unlock(%s)", (held_operation.LOCK_KEY,))
        first = first_sent.result()
        kept = effects(sql, "held", "deleted-in-flight")
        # The client retries what was not done; once done, the answer is replayed.
        final = retry_until_answered(send) if must_retry(first) else first
        replay = send()

    # Its key gone, the operation could not store its answer: it must not keep its work.
    assert kept == 0, (
        f"the operation committed its effect without its key (answered {first.status_code} "
        f"{first.text.strip()})"
    )
    assert must_retry(first), first.text
    assert (final.status_code, final.json()) == (201, {"charged": "deleted-in-flight"})
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert effects(sql, "held", "deleted-in-flight") == 1
