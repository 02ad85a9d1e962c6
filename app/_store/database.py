"""The app's database: its engine, sessions for readers and claim lanes, built once per app
by :func:`init_app` (the engines themselves: :mod:`idemhook._store.engine`)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from idemhook._store.engine import (
    APPLICATION_NAMES,
    Timeouts,
    application_name,
    build_engine,
    is_disconnect,
    timeouts_of,
)
from idemhook._store.lanes import Lanes
from idemhook._values.errors import ServiceUnavailable

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
        prepare: bool = False,
    ) -> None:
        self.engine = engine
        self.name = name
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.timeouts = timeouts
        self.pool_mode = pool_mode
        #: The claim's lanes; in session-pooler mode none is kept between deliveries.
        keep = 0 if pool_mode == "session-pooler" else _pool_size(engine)
        self.lanes = Lanes(engine, keep=keep, timeouts=timeouts, prepare=prepare)

    def session(self) -> Session:
        return self.sessions()

    @functools.cached_property
    def reserve(self) -> Engine:
        """Connections outside the lanes' pool, for rows written beside the requests.

        The request thread records a handler that overran while its claim thread
        still holds the attempt's connection, and handlers that overran may hold
        every connection of the pool: such a row must never wait for one. Each process
        also writes which secret verified its deliveries here, about once a second
        (:class:`idemhook._engine.tenants.Matches`), so one connection is kept (with
        ``IDEMHOOK_POOL_MODE=session-pooler``, none): opening one for every write cost
        PostgreSQL about 4 ms of CPU each time (docs/performance.md). Never waits: more
        writers at once each get a connection of their own, closed after use. SQLite
        (one writer) uses the engine.
        """
        if self.engine.dialect.name != "postgresql":
            return self.engine
        return build_engine(
            self.engine.url,
            timeouts=self.timeouts or Timeouts(2000, 2000, 0),
            pool_size=1,
            max_overflow=-1,
            pool_mode=self.pool_mode,
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
        engine,
        timeouts=timeouts,
        pool_mode=pool_mode,
        name=application_name(app.config),
        prepare=bool(app.config["IDEMHOOK_PREPARED_STATEMENTS"]),
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
    with unavailable_when_lost(), get_db().session() as session:
        yield session


@contextmanager
def unavailable_when_lost() -> Iterator[None]:
    """A lost database connection is answered 503 ``database_unavailable``, not 500."""
    try:
        yield
    except SQLAlchemyError as exc:
        if is_disconnect(exc):
            raise ServiceUnavailable(
                "The database is unavailable; retry shortly.", code="database_unavailable"
            ) from exc
        raise
