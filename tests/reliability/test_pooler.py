"""The receiver behind a real PgBouncer (docs/operations.md, "Behind a connection pooler").

Transaction mode, the recommended one: two receiver instances share a server
pool smaller than their threads, every delivery of a storm is answered 200 and
applied once, handlers run under the configured timeouts, stuck handlers are
cut off while the rest flows, and ``idemhook db upgrade`` works (through the
pooler, or over ``IDEMHOOK_MIGRATION_DATABASE_URL``). Session mode: the same
storm with ``IDEMHOOK_POOL_MODE=session-pooler``, and what happens without it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
from sqlalchemy.engine import URL

from idemhook import create_app
from idemhook.testing import postgres
from idemhook.testing.pgbouncer import PgBouncer
from idemhook.testing.postgres import connect_args
from tests.conftest import SECRET
from tests.plugins.probe import SETTINGS
from tests.reliability.conftest import FAULT_SOURCES, GUARD_SECONDS, signed_post, wait_for
from tests.servers import Server, gunicorn, toml

pytestmark = pytest.mark.fault

#: PgBouncer's server connections to the database: fewer than the receivers' threads.
SERVER_POOL = 3
#: Two instances of this many workers each, as a deployment scales out.
WORKERS = 2
STATEMENT_TIMEOUT_MS = 2500
HANDLER_TIMEOUT_MS = 4000
#: The storm: every ID delivered this many times, the copies spread over both instances.
STORM_IDS = 200
STORM_COPIES = 10
CLIENTS = 32

POOLER_SOURCES: dict[str, Any] = {
    "plugins": [*FAULT_SOURCES["plugins"], "tests.plugins.outside", "tests.plugins.probe"],
    "sources": {
        **FAULT_SOURCES["sources"],
        "outside": {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"},
        "probe": {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"},
    },
}
ENV = {
    "IDEMHOOK_STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
    "IDEMHOOK_HANDLER_TIMEOUT_MS": str(HANDLER_TIMEOUT_MS),
}


def _instances(
    stack: ExitStack, url: URL, count: int = 2, env: dict[str, str] | None = None
) -> list[Server]:
    return [
        stack.enter_context(
            gunicorn(POOLER_SOURCES, url, workers=WORKERS, env={**ENV, **(env or {})})
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def bouncer(pg_server: URL) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode with SERVER_POOL server connections per database."""
    with PgBouncer(pg_server, pool_mode="transaction", default_pool_size=SERVER_POOL) as found:
        yield found


@pytest.fixture(scope="module")
def instances(bouncer: PgBouncer, pg_url: URL) -> Iterator[list[Server]]:
    """Two receiver instances whose DATABASE_URL is the pooler."""
    with ExitStack() as stack:
        yield _instances(stack, bouncer.url_for(pg_url))


def _pool(bouncer: PgBouncer, database: str) -> dict[str, Any]:
    [pool] = [p for p in bouncer.show("POOLS") if p["database"] == database]
    return pool


def _storm(servers: Sequence[Server]) -> list[requests.Response]:
    """Deliver STORM_IDS events STORM_COPIES times each, concurrently, in random order.

    Copy k of every ID goes to instance k % len(servers), so each event reaches
    every instance, and concurrent duplicates meet on different instances.
    """
    ids = [f"storm-{i:03d}" for i in range(STORM_IDS)]
    deliveries = [
        (servers[copy % len(servers)].url, {"id": event_id, "type": "contact.updated"})
        for copy in range(STORM_COPIES)
        for event_id in ids
    ]
    random.Random(11).shuffle(deliveries)
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        return list(pool.map(lambda d: signed_post(d[0], "acme", d[1]), deliveries))


def _assert_applied_once(answers: list[requests.Response], sql) -> None:
    total = STORM_IDS * STORM_COPIES
    assert Counter(a.status_code for a in answers) == {200: total}, [
        a.text for a in answers if a.status_code != 200
    ][:5]
    statuses = Counter(a.json()["status"] for a in answers)
    assert statuses == {"processed": STORM_IDS, "duplicate": total - STORM_IDS}
    assert all(a.json()["result"] == {"applied": a.json()["event_id"]} for a in answers)
    # One effect per event: a second application would be a second row.
    assert sql("SELECT count(*), count(DISTINCT event_id) FROM test_effects")[0] == (
        STORM_IDS,
        STORM_IDS,
    )
    assert sql("SELECT count(*), sum(duplicate_count) FROM processed_events")[0] == (
        STORM_IDS,
        total - STORM_IDS,
    )
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == 0


# -- transaction mode ----------------------------------------------------------------------


@pytest.mark.gunicorn
def test_storm_through_a_transaction_pooler_smaller_than_the_receivers_applies_each_once(
    bouncer, instances, clean_db, sql
):
    answers = _storm(instances)

    _assert_applied_once(answers, sql)
    database = clean_db.database
    clients = [c for c in bouncer.show("CLIENTS") if c["database"] == database]
    servers = [s for s in bouncer.show("SERVERS") if s["database"] == database]
    # The receivers' connections outnumber the server connections that served them all...
    assert len(clients) > SERVER_POOL >= len(servers) > 0
    # ...because none holds a server connection between deliveries: no transaction, and no
    # session state, outlives a delivery.
    wait_for(
        lambda: _pool(bouncer, database)["sv_active"] == 0, "the server connections to be free"
    )


@pytest.mark.gunicorn
def test_handlers_behind_a_transaction_pooler_run_under_the_configured_timeouts(
    bouncer, instances, clean_db, pg_url
):
    # Several deliveries per instance, so they run on several of the pooler's connections.
    answers = [
        signed_post(server.url, "probe", {"id": f"probe-{n}-{i}"})
        for n, server in enumerate(instances)
        for i in range(4)
    ]

    expected = {
        "statement_timeout": f"{STATEMENT_TIMEOUT_MS}ms",
        "lock_timeout": f"{STATEMENT_TIMEOUT_MS}ms",
        # The backstop for a handler that never returns: after the handler timeout, plus
        # the statement timeout for the rollback to reach the server.
        "idle_in_transaction_session_timeout": f"{HANDLER_TIMEOUT_MS + STATEMENT_TIMEOUT_MS}ms",
    }
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert [a.json()["result"] for a in answers] == [expected] * len(answers)
    # SET LOCAL ends with the transaction: another client of the pooler, perhaps on the very
    # server connection a handler used, sees the server's own settings.
    assert _show(bouncer.url_for(pg_url)) == _show(pg_url)
    assert _show(pg_url)["statement_timeout"] != expected["statement_timeout"]


def _show(url: URL) -> dict[str, str]:
    conn = psycopg2.connect(**connect_args(url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            found = {}
            for name in SETTINGS:
                cur.execute(f"SHOW {name}")
                found[name] = cur.fetchone()[0]
            return found
    finally:
        conn.close()


@pytest.mark.gunicorn
def test_stuck_handlers_behind_a_transaction_pooler_are_cut_off_while_others_flow(
    bouncer, instances, clean_db, sql, tmp_path
):
    answers: dict[str, requests.Response] = {}

    def deliver(name: str, server: Server, source: str, payload: dict[str, Any]) -> None:
        answers[name] = signed_post(server.url, source, payload)

    # One stuck in SQL past the statement timeout, one stuck in Python past the handler
    # timeout (an outside API that hangs after its last SQL), one on each instance.
    calls = tmp_path / "calls.txt"
    stuck = [
        threading.Thread(
            target=deliver,
            args=(
                "sql",
                instances[0],
                "blocking",
                {"id": "stuck-sql", "block": "sleep", "seconds": 60},
            ),
        ),
        threading.Thread(
            target=deliver,
            args=(
                "python",
                instances[1],
                "outside",
                {"id": "stuck-py", "file": str(calls), "sleep": 2 * HANDLER_TIMEOUT_MS / 1000},
            ),
        ),
    ]
    for thread in stuck:
        thread.start()
    wait_for(
        lambda: sql(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'active' AND query LIKE '%pg_sleep%'"
        ),
        "the SQL handler to be stuck in pg_sleep",
    )
    wait_for(calls.exists, "the Python handler to be stuck")
    # Two of the three server connections are held by stuck transactions: the rest flows.
    others = [
        signed_post(server.url, "acme", {"id": f"other-{n}-{i}", "type": "contact.new"})
        for n, server in enumerate(instances)
        for i in range(3)
    ]
    still_stuck = [thread.is_alive() for thread in stuck]
    for thread in stuck:
        thread.join(timeout=GUARD_SECONDS)

    assert [o.json()["status"] for o in others] == ["processed"] * len(others)
    assert still_stuck == [True, True], "the other deliveries should finish while both are stuck"
    assert answers["sql"].status_code == 500 and answers["sql"].json()["error"] == "handler_failed"
    assert answers["python"].status_code == 503
    assert answers["python"].json()["error"] == "handler_timeout"
    failures = dict(sql("SELECT event_id, error FROM delivery_failures"))
    assert set(failures) == {"stuck-sql", "stuck-py"}
    assert "canceling statement due to statement timeout" in failures["stuck-sql"]
    assert "IDEMHOOK_HANDLER_TIMEOUT_MS" in failures["stuck-py"]
    # Neither committed anything; the abandoned one rolls back once its handler returns.
    wait_for(
        lambda: (
            not sql(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
        ),
        "the abandoned claim's transaction to end",
    )
    assert sql("SELECT count(*) FROM test_effects WHERE event_id LIKE 'stuck-%'")[0][0] == 0
    assert sql("SELECT count(*) FROM processed_events WHERE event_id LIKE 'stuck-%'")[0][0] == 0
    # The provider's retry of the one that hung in Python (it does not hang twice) applies it.
    payload = {"id": "stuck-py", "file": str(calls), "sleep": 2 * HANDLER_TIMEOUT_MS / 1000}
    retried = signed_post(instances[0].url, "outside", payload)
    assert retried.status_code == 200 and retried.json()["status"] == "processed"
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'stuck-py'")[0][0] == 1


# -- migrations ----------------------------------------------------------------------------


def _idemhook(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the console script as a release phase would."""
    config = tmp_path / "webhooks.toml"
    config.write_text(toml({"sources": {}}))
    return subprocess.run(
        [str(Path(sys.executable).parent / "idemhook"), *args],
        env={**os.environ, "IDEMHOOK_CONFIG": str(config), **env},
        capture_output=True,
        text=True,
        timeout=GUARD_SECONDS,
    )


def _url(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture
def empty_database(pg_server: URL) -> Iterator[URL]:
    """A new, empty database on the test server (no schema at all)."""
    url = postgres.create_database(pg_server, prefix="idemhook_pooler")
    yield url
    postgres.drop_database(url)


#: A source without handlers: its events are claimed as ``ignored``, no test tables needed.
OPEN_SOURCE = {
    "sources": {
        "open": {"scheme": "none", "allow_unverified": True, "event_id": "header:X-Event-Id"}
    }
}


def _claim_one(app, event_id: str):
    """Deliver one event of OPEN_SOURCE to an in-process ``app``."""
    headers = {"Content-Type": "application/json", "X-Event-Id": event_id}
    return app.test_client().post("/webhooks/open", data=b"{}", headers=headers)


def _ready_and_claiming(url: URL) -> None:
    """Assert that a receiver on ``url`` is ready and claims an event."""
    app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": OPEN_SOURCE})
    try:
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 200 and ready.get_json()["database"] == "ok", ready.get_json()
        answer = _claim_one(app, "e1")
        assert answer.status_code == 200 and answer.get_json()["status"] == "ignored"
    finally:
        app.extensions["idemhook.db"].engine.dispose()


def test_db_upgrade_runs_through_a_transaction_pooler(bouncer, empty_database, tmp_path):
    pooled = bouncer.url_for(empty_database)
    done = _idemhook("db", "upgrade", env={"DATABASE_URL": _url(pooled)}, tmp_path=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("database at ")
    _ready_and_claiming(pooled)


def test_db_upgrade_uses_the_migration_url_when_the_pooled_one_cannot_migrate(
    pg_server, empty_database, tmp_path
):
    # A pooled route on which DDL fails stands in for whatever makes a provider's pooled
    # URL unfit for migrations; reads (/readyz) and the receiver's own writes are not the
    # point here.
    target = f"host={pg_server.host} port={pg_server.port} dbname={empty_database.database}"
    route = f"{target} connect_query='SET default_transaction_read_only = on'"
    with PgBouncer(
        pg_server, default_pool_size=SERVER_POOL, databases={"idemhook_pooled": route}
    ) as readonly:
        pooled = readonly.url_for(empty_database).set(database="idemhook_pooled")
        env = {"DATABASE_URL": _url(pooled)}
        refused = _idemhook("db", "upgrade", env=env, tmp_path=tmp_path)
        env["IDEMHOOK_MIGRATION_DATABASE_URL"] = _url(empty_database)
        done = _idemhook("db", "upgrade", env=env, tmp_path=tmp_path)

        assert refused.returncode != 0 and "read-only transaction" in refused.stderr
        assert done.returncode == 0, done.stderr
        app = create_app({"DATABASE_URL": pooled, "IDEMHOOK_CONFIG": {}})
        try:
            ready = app.test_client().get("/readyz")
        finally:
            app.extensions["idemhook.db"].engine.dispose()
        assert ready.status_code == 200 and ready.get_json()["database"] == "ok"
    _ready_and_claiming(empty_database)


# -- session mode --------------------------------------------------------------------------


@pytest.mark.gunicorn
def test_storm_through_a_session_pooler_with_the_session_pooler_setting_never_starves(
    pg_server, pg_url, clean_db, sql
):
    with ExitStack() as stack:
        session = stack.enter_context(
            PgBouncer(pg_server, pool_mode="session", default_pool_size=SERVER_POOL)
        )
        servers = _instances(
            stack, session.url_for(pg_url), env={"IDEMHOOK_POOL_MODE": "session-pooler"}
        )
        answers = _storm(servers)
        # Idle, the receivers hold no server connection: the next client gets one at once.
        wait_for(
            lambda: _pool(session, pg_url.database)["sv_active"] == 0,
            "the receivers to give their server connections back",
        )

    _assert_applied_once(answers, sql)


def test_without_the_setting_an_idle_instance_keeps_a_session_poolers_connection(
    pg_server, pg_url, clean_db
):
    # One server connection, and a pooler that gives up on a waiting client after 1 s
    # (PgBouncer's default is 120 s): instance A keeps its connection while idle, so
    # instance B cannot get one; with IDEMHOOK_POOL_MODE=session-pooler it can.
    with PgBouncer(
        pg_server, pool_mode="session", default_pool_size=1, settings={"query_wait_timeout": 1}
    ) as session:
        url = session.url_for(pg_url)
        answers = {}
        for mode in ("keep", "session-pooler"):
            settings = {"DATABASE_URL": url, "IDEMHOOK_CONFIG": OPEN_SOURCE}
            a, b = (create_app({**settings, "IDEMHOOK_POOL_MODE": mode}) for _ in range(2))
            try:
                first, second = _claim_one(a, f"{mode}-a"), _claim_one(b, f"{mode}-b")
                # Neither instance has a delivery in flight now.
                answers[mode] = first, second, _pool(session, pg_url.database)["sv_active"]
            finally:
                for app in (a, b):
                    app.extensions["idemhook.db"].engine.dispose()

    kept_a, kept_b, kept_active = answers["keep"]
    assert kept_a.status_code == 200
    assert kept_b.status_code == 503 and kept_b.get_json()["error"] == "database_unavailable"
    assert kept_active == 1  # the pooler's only server connection, kept by idle A
    shared_a, shared_b, shared_active = answers["session-pooler"]
    assert [shared_a.status_code, shared_b.status_code] == [200, 200]
    assert shared_active == 0


@pytest.mark.gunicorn
def test_prepared_statements_set_by_mistake_behind_a_transaction_pooler_lose_nothing(
    bouncer, clean_db, sql
):
    """``IDEMHOOK_PREPARED_STATEMENTS=true`` is for direct connections. Behind a
    transaction-mode pooler a lane's next transaction may run in a server session that
    lacks its statements: that delivery is rolled back and answered 5xx, its process turns
    preparing off (and says so), and the sender's retry is applied. Every event of a
    concurrent storm, each retried until answered 200, is applied exactly once."""
    ids = [f"prep-{i:03d}" for i in range(STORM_IDS)]
    with ExitStack() as stack:
        servers = _instances(
            stack, bouncer.url_for(clean_db), env={"IDEMHOOK_PREPARED_STATEMENTS": "true"}
        )

        def until_answered(n_and_id: tuple[int, str]) -> list[int]:
            n, event_id = n_and_id
            statuses = []
            for _ in range(5):  # a provider retries; these retry at once
                answer = signed_post(
                    servers[n % len(servers)].url,
                    "acme",
                    {"id": event_id, "type": "contact.updated"},
                )
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    break
            return statuses

        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            tries = list(pool.map(until_answered, enumerate(ids)))
        logs = "".join(server.log() for server in servers)

    assert all(statuses[-1] == 200 for statuses in tries), tries
    refused = [s for statuses in tries for s in statuses if s != 200]
    assert all(s >= 500 for s in refused)
    # At most one lost transaction per lane: each worker stops preparing after its first.
    assert len(refused) <= len(servers) * WORKERS * 2 * 4
    if refused:
        assert "IDEMHOOK_PREPARED_STATEMENTS is on, but a database session lacked" in logs
    assert sql("SELECT count(*), count(DISTINCT event_id) FROM test_effects")[0] == (
        STORM_IDS,
        STORM_IDS,
    )
    assert sql("SELECT count(*) FROM processed_events WHERE status = 'processed'")[0][0] == (
        STORM_IDS
    )
