"""Engines: the connections idemhook opens, their timeouts, names and fork safety.

PostgreSQL is the production database. SQLite serves the zero-setup demo with
the same semantics: one writer at a time (``BEGIN IMMEDIATE``), so a duplicate
waits for the first delivery exactly as it waits on PostgreSQL's unique index.

Pooler-safe by construction (docs/operations.md, "Behind a connection pooler"):

- no startup parameters but ``application_name`` (which every pooler accepts);
  the timeouts are set per transaction with ``SET LOCAL`` (:class:`Timeouts`),
  so they hold in PgBouncer's transaction mode, where consecutive transactions
  of one client may run on different server connections;
- no session state that outlives a transaction, and no server-side prepared
  statements (psycopg2 sends every statement as text);
- ``IDEMHOOK_POOL_MODE=session-pooler`` holds a connection only while a
  delivery uses it, so a session-mode pooler's server connections are shared
  by every worker instead of being kept by whichever worker opened them.

Connections opened before a fork (``gunicorn --preload``, or a plugin that
queries at import) belong to the parent: in the child their sockets are pointed
at ``/dev/null`` and the engine's pool is replaced (:func:`_after_fork`), so
nothing the child does, closes or garbage-collects can reach the parent's
PostgreSQL sessions.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from idemhook._config.settings import POOL_MODES
from idemhook._values.errors import ConfigError
from idemhook._values.jsontext import dumps, loads

#: Execution option marking a claim lane's connection (its transactions are the claim's own).
LANE_OPTION = "idemhook_lane"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The bounds every transaction runs under, set with ``SET LOCAL`` when it begins.

    ``statement_ms`` and ``lock_ms`` bound one statement and one lock wait;
    ``idle_ms`` is PostgreSQL's ``idle_in_transaction_session_timeout``, the
    backstop that ends a session whose request stopped waiting for it (a
    handler that overran ``IDEMHOOK_HANDLER_TIMEOUT_MS`` and never returned).
    0 means "no bound" (migrations have no statement timeout).
    """

    statement_ms: int
    lock_ms: int
    idle_ms: int

    @property
    def sql(self) -> str:
        """The ``SET LOCAL`` statements, one string (sent with ``BEGIN`` by the claim)."""
        return (
            f"SET LOCAL statement_timeout = {int(self.statement_ms)}; "
            f"SET LOCAL lock_timeout = {int(self.lock_ms)}; "
            f"SET LOCAL idle_in_transaction_session_timeout = {int(self.idle_ms)}"
        )


def timeouts_of(config: Any) -> Timeouts:
    """The claim's timeouts from the settings (docs/configuration.md)."""
    statement = int(config["IDEMHOOK_STATEMENT_TIMEOUT_MS"])
    handler = int(config["IDEMHOOK_HANDLER_TIMEOUT_MS"])
    return Timeouts(statement, statement, handler + statement)


#: The ``application_name`` of each process role (``IDEMHOOK_APPLICATION_NAME`` overrides it).
APPLICATION_NAMES = {"web": "idemhook-web", "worker": "idemhook-worker", "cli": "idemhook-cli"}


def application_name(config: Any) -> str:
    """The name this process's connections carry in ``pg_stat_activity``."""
    return config.get("IDEMHOOK_APPLICATION_NAME") or APPLICATION_NAMES["web"]


def build_engine(
    url: URL,
    *,
    timeouts: Timeouts,
    pool_size: int,
    pool_mode: str = "keep",
    name: str = APPLICATION_NAMES["web"],
    max_overflow: int | None = None,
) -> Engine:
    """Create the engine for ``url`` with the timeouts and pool the claim path relies on.

    ``max_overflow``: connections opened beyond ``pool_size`` when all are in use (closed
    when given back); ``pool_size`` unless given, -1 for no bound (never waits)."""
    if pool_mode not in POOL_MODES:
        raise ConfigError(f"IDEMHOOK_POOL_MODE must be one of {', '.join(POOL_MODES)}")
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_ms=timeouts.statement_ms or 60_000)
    pool: dict[str, Any] = (
        {"poolclass": NullPool}
        if pool_mode == "session-pooler"
        else {
            "pool_size": pool_size,
            "max_overflow": pool_size if max_overflow is None else max_overflow,
            "pool_recycle": 3600,
        }
    )
    engine = create_engine(
        url,
        # A connection handed out after a database restart is tested first (a round trip
        # per checkout, which the claim pays only when it opens a lane).
        pool_pre_ping=True,
        # Statement parameters carry payloads and raw bodies: keep them out of logs and
        # exception messages, even with sqlalchemy.engine logging turned up.
        hide_parameters=True,
        json_serializer=dumps,
        json_deserializer=loads,
        connect_args={
            # The only startup parameter: poolers refuse `options`, all accept this one.
            "application_name": name,
            "connect_timeout": 3,
            "keepalives": 1,
            "keepalives_idle": 30,
        },
        **pool,
    )
    _track_connections(engine)
    _set_timeouts_per_transaction(engine, timeouts)
    return engine


def _set_timeouts_per_transaction(engine: Engine, timeouts: Timeouts) -> None:
    """Every SQLAlchemy transaction starts with the ``SET LOCAL`` timeouts.

    The claim's lanes send the same statements themselves, in the round trip of
    their ``BEGIN`` (:mod:`idemhook._store.lanes`); their connections are marked and skipped.
    """
    statements = timeouts.sql

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if not connection.get_execution_options().get(LANE_OPTION):
            connection.exec_driver_sql(statements)


def _sqlite_engine(url: URL, *, busy_timeout_ms: int) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        # Named parameters, as the claim's precompiled statements pass them (app.claim).
        paramstyle="named",
        hide_parameters=True,
        json_serializer=dumps,
        json_deserializer=loads,
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see "begin").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # Take the write lock up front: a concurrent duplicate waits here instead of
        # failing with "database is locked" when it upgrades a read lock.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# -- fork safety -----------------------------------------------------------------------------

#: Every open PostgreSQL DBAPI connection of this process and the pid that opened it.
_open: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
#: Every engine built here (the fork hook replaces their pools in the child).
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
#: Connections inherited through a fork: kept referenced, so never even collected here.
inherited_connections: list[Any] = []


def _track_connections(engine: Engine) -> None:
    _engines.add(engine)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        _open[dbapi_connection] = os.getpid()


def _after_fork() -> None:
    """In a forked child: make the parent's connections unreachable, start fresh pools.

    SQLAlchemy's documented pattern is ``engine.dispose(close=False)``; that alone
    still lets the child's garbage collector (or a pool's reset-on-return) send a
    ROLLBACK or a Terminate message down the parent's socket. Pointing each
    inherited socket at ``/dev/null`` first makes anything the child does with
    it harmless: a write goes nowhere, a read finds the connection closed.
    """
    pid = os.getpid()
    inherited = [conn for conn, owner in list(_open.items()) if owner != pid]
    if inherited:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for conn in inherited:
                try:
                    os.dup2(devnull, conn.fileno())
                except (OSError, ValueError, AttributeError):
                    pass  # already closed
                inherited_connections.append(conn)
        finally:
            os.close(devnull)
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork)


def is_disconnect(exc: BaseException | None) -> bool:
    """True when ``exc`` means the database connection is gone (restart, network, down)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        # Connecting failed outright (server down): psycopg2 reports OperationalError
        # without a SQLSTATE; a cancelled statement or lock timeout has one.
        orig = exc.orig
        return exc.__class__.__name__ == "OperationalError" and getattr(orig, "pgcode", "") is None
    return False


def is_timeout(exc: DBAPIError) -> bool:
    """True when PostgreSQL gave up waiting: a lock timeout (55P03) or a statement timeout."""
    # 55P03 lock_not_available, 57014 query_canceled (statement_timeout).
    return getattr(exc.orig, "pgcode", None) in ("55P03", "57014")


def aware(value: datetime | str) -> datetime:
    """A timestamp as the database handed it back, made timezone-aware (UTC).

    PostgreSQL's ``timestamptz`` comes back aware; SQLite (the demo) hands back naive
    datetimes, or text through a lane's cursor.
    """
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
