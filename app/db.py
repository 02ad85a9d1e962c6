"""The engine and session factory, built once per app by :func:`init_app`.

PostgreSQL is the production database. SQLite serves the zero-setup demo with
the same semantics: one writer at a time (``BEGIN IMMEDIATE``), so a duplicate
waits for the first delivery exactly as it waits on PostgreSQL's unique index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

#: Key of the wrapper that holds a payload PostgreSQL's JSONB cannot store.
RAW_JSON_KEY = "$idemhook_raw_json"


def dumps(value: Any, *, strict: bool = False) -> str:
    """Serialise JSON for storage, wrapping what JSONB would refuse instead of failing.

    JSONB rejects ``\\u0000`` and lone UTF-16 surrogates. Such a value is stored
    as ``{"$idemhook_raw_json": "<its exact JSON text>"}`` so that nothing is lost
    and the provider is not made to retry forever (see docs/querying.md).
    ``strict``: NaN and infinities raise ``ValueError`` (they are not JSON, and
    JSONB refuses them): a handler result that holds one fails its event.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=not strict)
    if "\\u0000" in text:
        return _wrap(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _wrap(value)
    return text


def _wrap(value: Any) -> str:
    return json.dumps({RAW_JSON_KEY: json.dumps(value, separators=(",", ":"))})


def loads(text: str) -> Any:
    value = json.loads(text)
    if isinstance(value, dict) and len(value) == 1 and RAW_JSON_KEY in value:
        return json.loads(value[RAW_JSON_KEY])
    return value


def build_engine(url: URL, *, statement_timeout_ms: int, pool_size: int) -> Engine:
    """Create the engine for ``url`` with the timeouts and pool the claim path relies on."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_ms=statement_timeout_ms)
    timeout = int(statement_timeout_ms)
    options = (
        f"-c statement_timeout={timeout} -c lock_timeout={timeout} "
        # A handler stuck in Python (not in SQL) must not hold its claim forever either.
        f"-c idle_in_transaction_session_timeout={max(timeout * 2, 1000)}"
    )
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=3600,
        # Statement parameters carry payloads and raw bodies: keep them out of logs and
        # exception messages, even with sqlalchemy.engine logging turned up.
        hide_parameters=True,
        json_serializer=dumps,
        json_deserializer=loads,
        connect_args={
            "options": options,
            "application_name": "idemhook",
            "connect_timeout": 3,
            "keepalives": 1,
            "keepalives_idle": 30,
        },
    )


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
        connect_args={"timeout": busy_timeout_ms / 1000},
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


class Database:
    """What :func:`init_app` keeps on ``app.extensions["idemhook.db"]``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        return self.sessions()


def init_app(app: Flask) -> Database:
    database = Database(
        build_engine(
            app.config["DATABASE_URL"],
            statement_timeout_ms=app.config["IDEMHOOK_STATEMENT_TIMEOUT_MS"],
            pool_size=app.config["IDEMHOOK_POOL_SIZE"],
        )
    )
    app.extensions["idemhook.db"] = database
    return database


def get_db(app: Flask | None = None) -> Database:
    return (app or current_app).extensions["idemhook.db"]


def is_disconnect(exc: BaseException) -> bool:
    """True when ``exc`` means the database connection is gone (restart, network, down)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        # Connecting failed outright (server down): psycopg2 reports OperationalError
        # without a SQLSTATE; a cancelled statement or lock timeout has one.
        orig = exc.orig
        return exc.__class__.__name__ == "OperationalError" and getattr(orig, "pgcode", "") is None
    return False
