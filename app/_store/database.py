"""The connection layer: engine, sessions and claim lanes, built once per app by :func:`init_app`.

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

import functools
import json
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from idemhook._config.settings import POOL_MODES
from idemhook._values.errors import ConfigError, ServiceUnavailable
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

#: Key of the wrapper that holds a payload PostgreSQL's JSONB cannot store.
RAW_JSON_KEY = "$idemhook_raw_json"


#: Execution option marking a claim lane's connection (its transactions are the claim's own).
LANE_OPTION = "idemhook_lane"


def dumps(value: Any, *, strict: bool = False) -> str:
    """Serialise JSON for storage, wrapping what JSONB would refuse instead of failing.

    JSONB rejects ``\\u0000`` and lone UTF-16 surrogates. Such a value is stored
    as ``{"$idemhook_raw_json": "<its exact JSON text>"}`` so that nothing is lost
    and the provider is not made to retry forever (see docs/querying.md).
    ``strict``: NaN and infinities raise ``ValueError`` (they are not JSON, and
    JSONB refuses them): a handler result that holds one fails its event.
    """
    text = (_STRICT if strict else _LENIENT).encode(value)
    if "\\u0000" in text:
        return _wrap(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _wrap(value)
    return text


# Built once: ``json.dumps`` with options builds a new encoder on every call.
_LENIENT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _wrap(value: Any) -> str:
    return json.dumps({RAW_JSON_KEY: json.dumps(value, separators=(",", ":"))})


def loads(text: str) -> Any:
    value = json.loads(text)
    if isinstance(value, dict) and len(value) == 1 and RAW_JSON_KEY in value:
        return json.loads(value[RAW_JSON_KEY])
    return value


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
) -> Engine:
    """Create the engine for ``url`` with the timeouts and pool the claim path relies on."""
    if pool_mode not in POOL_MODES:
        raise ConfigError(f"IDEMHOOK_POOL_MODE must be one of {', '.join(POOL_MODES)}")
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_ms=timeouts.statement_ms or 60_000)
    pool: dict[str, Any] = (
        {"poolclass": NullPool}
        if pool_mode == "session-pooler"
        else {"pool_size": pool_size, "max_overflow": pool_size, "pool_recycle": 3600}
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
_inherited: list[Any] = []


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
                _inherited.append(conn)
        finally:
            os.close(devnull)
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork)


# -- the app's database ----------------------------------------------------------------------


class Database:
    """What :func:`init_app` keeps on ``app.extensions["idemhook.db"]``."""

    def __init__(
        self,
        engine: Engine,
        *,
        timeouts: Timeouts | None = None,
        pool_mode: str = "keep",
        name: str = APPLICATION_NAMES["web"],
    ) -> None:
        from idemhook._store.lanes import Lanes

        self.engine = engine
        self.name = name
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.timeouts = timeouts
        self.pool_mode = pool_mode
        #: The claim's lanes; in session-pooler mode none is kept between deliveries.
        keep = 0 if pool_mode == "session-pooler" else _pool_size(engine)
        self.lanes = Lanes(engine, keep=keep, timeouts=timeouts)

    def session(self) -> Session:
        return self.sessions()

    @functools.cached_property
    def reserve(self) -> Engine:
        """Connections of their own, outside the pool, for rows written beside an attempt.

        The request thread records a handler that overran while its claim thread
        still holds the attempt's connection, and handlers that overran may hold
        every connection of the pool: such a row must never wait for one. No
        connection is kept (overruns are rare); SQLite (one writer) uses the engine.
        """
        if self.engine.dialect.name != "postgresql":
            return self.engine
        return build_engine(
            self.engine.url,
            timeouts=self.timeouts or Timeouts(2000, 2000, 0),
            pool_size=1,
            pool_mode="session-pooler",
            name=self.name,
        )


def _pool_size(engine: Engine) -> int:
    size = getattr(engine.pool, "size", None)
    return size() if callable(size) else 4


def init_app(app: Flask) -> Database:
    timeouts = timeouts_of(app.config)
    pool_mode = app.config["IDEMHOOK_POOL_MODE"]
    engine = build_engine(
        app.config["DATABASE_URL"],
        timeouts=timeouts,
        pool_size=app.config["IDEMHOOK_POOL_SIZE"],
        pool_mode=pool_mode,
        name=application_name(app.config),
    )
    database = Database(
        engine, timeouts=timeouts, pool_mode=pool_mode, name=application_name(app.config)
    )
    app.extensions["idemhook.db"] = database
    return database


def migration_engine(app: Flask) -> Engine:
    """The engine migrations run on: ``IDEMHOOK_MIGRATION_DATABASE_URL``, else ``DATABASE_URL``.

    Migrations have no statement timeout (an index build on a large table takes
    minutes) but keep the lock timeout, so a migration waiting for a table lock
    gives up rather than stall every delivery queued behind it. No connection is
    kept (``NullPool``): ``idemhook db`` runs once, in a release phase.
    """
    found = app.extensions.get("idemhook.migration_engine")
    if found is None:
        url = app.config.get("IDEMHOOK_MIGRATION_DATABASE_URL") or app.config["DATABASE_URL"]
        lock_ms = int(app.config["IDEMHOOK_STATEMENT_TIMEOUT_MS"])
        found = app.extensions["idemhook.migration_engine"] = build_engine(
            url,
            timeouts=Timeouts(0, lock_ms, 0),
            pool_size=1,
            pool_mode="session-pooler",
            name=application_name(app.config),
        )
    return found


def get_db(app: Flask | None = None) -> Database:
    return (app or current_app).extensions["idemhook.db"]


@contextmanager
def read_session() -> Iterator[Session]:
    """A session of the app's database for a read endpoint; a lost database answers 503."""
    try:
        with get_db().session() as session:
            yield session
    except SQLAlchemyError as exc:
        if is_disconnect(exc):
            raise ServiceUnavailable(
                "The database is unavailable; retry shortly.", code="database_unavailable"
            ) from exc
        raise


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
