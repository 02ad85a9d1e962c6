"""Claim lanes: connections kept for the claim, each with its cursor and handler session.

A lane is one database connection checked out of the engine's pool once and
then reused by one claim at a time, together with a DBAPI cursor for the
claim's own statements and the :class:`~app.claim.ClaimSession` that handlers
get. Checking a connection out of the pool, building a Session and running the
claim's statements through SQLAlchemy cost the receiver more CPU than the
whole bare-minimum request it is measured against (docs/performance.md, "What
each optimisation bought"); a lane pays for them once per connection instead
of once per event.

The transaction's verbs are the claim's own on PostgreSQL: the connection is in
autocommit mode at the driver, ``BEGIN`` travels with the claim ``INSERT`` and
``COMMIT`` with the statement that stores the result, so an event costs the
round trips of its statements and no more. SQLAlchemy's transaction on the
connection is bookkeeping there: the handler session joins it, and its begin,
commit and rollback send nothing. On SQLite (the demo) SQLAlchemy's
transaction is the real one (``BEGIN IMMEDIATE``, see :mod:`app.db`).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, RootTransaction, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

#: SQLAlchemy's statement log: the lanes' statements appear there too, without parameters.
statement_log = logging.getLogger("sqlalchemy.engine.Engine")

#: A lane's connection is replaced after this long, as the pool's ``pool_recycle`` would.
RECYCLE_SECONDS = 3600


class Lane:
    """One connection, its cursor and its handler session; used by one claim at a time."""

    def __init__(self, connection: Connection, session: Session, pipelined: bool) -> None:
        self.connection = connection
        self.session = session
        self.pipelined = pipelined
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        self.cursor = dbapi_connection.cursor()
        self.opened = time.monotonic()
        self.pid = os.getpid()
        self._dialect = connection.dialect
        self._transaction: RootTransaction | None = None
        self._server_open = False  # PostgreSQL: our BEGIN has been sent

    @property
    def usable(self) -> bool:
        return not self.connection.invalidated and not self.connection.closed

    def begin(self) -> None:
        """Start a transaction; on PostgreSQL its BEGIN leaves with the first statement."""
        self._transaction = self.connection.begin()
        self._server_open = False

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run ``sql`` on the lane's cursor (in the transaction); return the cursor."""
        if self.pipelined and not self._server_open:
            sql = "BEGIN; " + sql
            self._server_open = True
        if statement_log.isEnabledFor(logging.INFO):
            statement_log.info("%s\n[claim lane; parameters hidden]", sql)
        try:
            self.cursor.execute(sql, params)
        except self._dialect.loaded_dbapi.Error as exc:
            raise self._wrap(exc, sql, params) from exc
        return self.cursor

    def ensure_begun(self) -> None:
        """Send the pending BEGIN now: SQLAlchemy is about to speak on the connection."""
        if self.pipelined and not self._server_open:
            self.execute("SELECT 1")

    def commit(self, sql: str | None = None, params: Mapping[str, Any] | None = None) -> None:
        """Run ``sql`` (if any), then commit; on PostgreSQL both leave in one message."""
        if self.pipelined:
            if self._server_open or sql:
                self.execute(f"{sql}; COMMIT" if sql else "COMMIT", params)
            self._server_open = False
        elif sql:
            self.execute(sql, params)
        transaction, self._transaction = self._transaction, None
        if transaction is not None and transaction.is_active:
            transaction.commit()

    def rollback(self) -> None:
        """Roll back whatever the transaction did; never raises for a dead connection."""
        transaction, self._transaction = self._transaction, None
        try:
            if self.pipelined and self._server_open and self.usable:
                self._server_open = False
                self.cursor.execute("ROLLBACK")
        except self._dialect.loaded_dbapi.Error as exc:
            self._wrap(exc, "ROLLBACK", None)  # invalidates the connection if it is gone
        finally:
            if transaction is not None and transaction.is_active:
                try:
                    transaction.rollback()
                except DBAPIError:
                    pass  # the connection is gone; the server has rolled back already

    def close(self, *, hard: bool = False) -> None:
        """Give the connection back to the pool; ``hard``: close it for good."""
        try:
            self.session.close()
        finally:
            if hard:
                self.connection.invalidate()
            self.connection.close()

    def _wrap(self, exc: Exception, sql: str, params: Any) -> DBAPIError:
        """The DBAPIError SQLAlchemy would raise; a lost connection is invalidated."""
        disconnect = self._dialect.is_disconnect(exc, self.connection.connection, self.cursor)
        if disconnect and not self.connection.invalidated:
            self.connection.invalidate(exc)
        wrapped = DBAPIError.instance(
            sql,
            params,
            exc,
            self._dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=disconnect,
            dialect=self._dialect,
        )
        assert isinstance(wrapped, DBAPIError)
        return wrapped


class Lanes:
    """The idle lanes of one engine: taken by a claim, given back when it ends.

    At most ``keep`` idle lanes are kept (the pool size: one per worker thread);
    a lane whose connection was lost, or that is older than ``RECYCLE_SECONDS``,
    is closed instead of kept. ``Engine.dispose()`` closes the idle lanes too.
    """

    def __init__(self, engine: Engine, make_session: Callable[[Connection], Session], keep: int):
        self.engine = engine
        self.keep = keep
        self._make_session = make_session
        self._idle: list[Lane] = []
        self._generation = 0
        self._pipelined = engine.dialect.name == "postgresql"
        # Both hooks hold the idle lanes, never this object: a lane's connection holds the
        # engine, so a strong reference from the engine back here would keep all of it alive.
        event.listen(engine, "engine_disposed", _closer(weakref.ref(self)))
        # At exit, or when the app is dropped, the kept connections go back to the pool
        # (which closes them) instead of being reclaimed, with a warning, by the collector.
        weakref.finalize(self, _give_back, self._idle)

    @contextmanager
    def lane(self) -> Iterator[Lane]:
        """A lane for one claim (its transaction is the caller's to begin and end)."""
        generation = self._generation
        try:
            lane = self._idle.pop()  # atomic: threads never share a lane
            if lane.pid != os.getpid():
                # Inherited through a fork: the parent's socket, never ours to use or close.
                self._idle.clear()
                lane = self._open()
        except IndexError:
            lane = self._open()
        try:
            yield lane
        finally:
            if generation != self._generation:
                lane.close(hard=True)  # the engine was disposed meanwhile
            elif (
                lane.usable
                and len(self._idle) < self.keep
                and time.monotonic() - lane.opened < RECYCLE_SECONDS
            ):
                self._idle.append(lane)
            else:
                lane.close()

    def close(self) -> None:
        """Close every idle lane's connection (lanes in use: when they are given back).

        Lanes inherited from a parent process (``Engine.dispose(close=False)`` after
        a fork) are forgotten, never closed: their sockets are the parent's.
        """
        self._generation += 1
        _drain(self._idle, hard=True)

    def _open(self) -> Lane:
        connection = self.engine.connect()
        try:
            if self._pipelined:
                connection.execution_options(isolation_level="AUTOCOMMIT")
            return Lane(connection, self._make_session(connection), self._pipelined)
        except BaseException:
            connection.close()
            raise


def _closer(lanes: weakref.ref[Lanes]) -> Callable[[Engine], None]:
    def on_dispose(_engine: Engine) -> None:
        alive = lanes()
        if alive is not None:
            alive.close()

    return on_dispose


def _give_back(idle: list[Lane]) -> None:
    try:
        _drain(idle, hard=False)
    except Exception:  # noqa: BLE001 (at exit: the database may be gone already)
        pass


def _drain(idle: list[Lane], *, hard: bool) -> None:
    """Close the lanes in ``idle``; a lane inherited through a fork is only forgotten."""
    while idle:
        try:
            lane = idle.pop()
        except IndexError:  # another thread took the last one
            break
        if lane.pid == os.getpid():
            lane.close(hard=hard)
