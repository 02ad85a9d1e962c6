"""Claim lanes: connections kept for the claim, each with its cursor and handler session.

A lane is one database connection checked out of the engine's pool once and
then reused by one claim at a time, together with a DBAPI cursor for the
claim's own statements and the :class:`~idemhook._engine.dispatch.ClaimSession` that
handlers get. Checking a connection out of the pool, building a Session and
running the claim's statements through SQLAlchemy cost the receiver more CPU
than the whole bare-minimum request it is measured against (docs/performance.md,
"What each optimisation bought"); a lane pays for them once per connection
instead of once per event.

The transaction's verbs are the claim's own on PostgreSQL: the connection is in
autocommit mode at the driver, ``BEGIN`` and the ``SET LOCAL`` timeouts travel
with the claim ``INSERT``, and ``COMMIT`` with the statement that stores the
result, so an event costs the round trips of its statements and no more, and
nothing outlives the transaction (transaction-mode poolers). SQLAlchemy's
transaction on the connection is bookkeeping there: the handler session joins
it, and its begin, commit and rollback send nothing. On SQLite (the demo)
SQLAlchemy's transaction is the real one (``BEGIN IMMEDIATE``, see :mod:`idemhook._store.database`).

A lost connection anywhere (a lane's statement, a handler's, any other query
of the engine) retires every idle lane, as SQLAlchemy's pool retires every
connection older than a disconnect: after a database restart one delivery per
worker meets a dead connection, before any handler ran, and is retried on a
fresh one (:mod:`idemhook._engine.claim`).

The claim's statements go to the cursor directly unless someone listens to the
engine's cursor events (OpenTelemetry's SQLAlchemy instrumentation, a test):
then they go through ``Connection.exec_driver_sql`` so that every listener sees them.

With ``IDEMHOOK_PREPARED_STATEMENTS`` on, each lane prepares the registered statements
on its connection when it opens (and before its next transaction when more are
registered) and sends their ``EXECUTE`` instead (:mod:`idemhook._store.prepared`); a
session that lacks them turns preparing off, a plan a schema change made stale retires
the lane's connection.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, RootTransaction, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import TextClause

from idemhook._store.engine import LANE_OPTION, Timeouts, inherited_connections
from idemhook._store.prepared import CACHE_SIZE, MISSING, STALE, Prepared
from idemhook._store.session import ClaimSession, Rows

#: SQLAlchemy's statement log: the lanes' statements appear there too, without parameters.
statement_log = logging.getLogger("sqlalchemy.engine.Engine")

#: A lane's connection is replaced after this long, as the pool's ``pool_recycle`` would.
RECYCLE_SECONDS = 3600
#: How many handlers' ``text()`` statements the lanes keep compiled (Lane.run_text).
TEXT_CACHE_SIZE = 1024
#: The savepoint each event of a claim runs in, and its verbs.
SAVEPOINT = "SAVEPOINT idemhook_event"
RELEASE = "RELEASE SAVEPOINT idemhook_event"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT idemhook_event"


class Lane:
    """One connection, its cursor and its handler session; used by one claim at a time."""

    def __init__(self, lanes: Lanes, connection: Connection, session: ClaimSession) -> None:
        self.connection = connection
        self.session = session
        self.pipelined = lanes.pipelined
        self._begin = lanes.begin_sql
        self._alone = lanes.alone_sql
        self._lanes = weakref.ref(lanes)
        dbapi_connection = connection.connection.dbapi_connection
        if dbapi_connection is None:
            raise RuntimeError("a lane needs a live DBAPI connection")
        self.cursor = dbapi_connection.cursor()
        self.opened = time.monotonic()
        self.pid = os.getpid()
        self.generation = lanes.generation
        self._dialect = connection.dialect
        #: SQLAlchemy's transaction on the connection. On PostgreSQL it is bookkeeping only
        #: (the driver is in autocommit mode; the lane sends BEGIN and COMMIT itself), so it
        #: is begun when something takes SQLAlchemy's path (:meth:`send_pending`), not for a
        #: claim whose statements all go through the lane: about 35,000 instructions.
        self._transaction: RootTransaction | None = None
        self._open = False  # a transaction of the lane's is open (begin ... commit/rollback)
        self._server_open = False  # PostgreSQL: our BEGIN has been sent
        self._savepoint = False  # this transaction has an event savepoint
        self._pending = ""  # PostgreSQL: savepoint statements that leave with the next one
        self._traced = False
        #: Handlers' ``text()`` statements as SQL, shared by the engine's lanes (run_text).
        self._lanes_texts = lanes.texts
        #: IDEMHOOK_PREPARED_STATEMENTS: the names prepared on this connection, the registry
        #: version they reflect, and the messages translated to their EXECUTEs so far.
        self._prepared = lanes.prepared
        self._prepared_names: set[str] = set()
        self._prepared_version = -1
        self._translated: dict[str, str] = {}
        #: A prepared statement's plan went stale under a schema change (SQLSTATE 0A000):
        #: the connection is closed when given back, and its successor prepares afresh.
        self._stale_plans = False
        if self.pipelined:
            session.direct = self.run_text
            session.before_statement = self.send_pending

    @property
    def usable(self) -> bool:
        return not self.connection.invalidated and not self.connection.closed

    def prepare(self) -> None:
        """Prepare the registered statements this connection lacks (outside a transaction)."""
        prepared = self._prepared
        if self._prepared_version == prepared.version:
            return
        self._prepared_version = prepared.version
        self._translated = {}
        if not prepared.enabled:
            self._prepared_names = set()
            return
        try:
            prepared.prepare_on(self.cursor, self._prepared_names)
        except self._dialect.loaded_dbapi.Error as exc:
            raise self._wrap(exc, "PREPARE", None) from exc

    def _translate(self, sql: str) -> str:
        """``sql`` with the statements prepared on this connection as their EXECUTEs."""
        found = self._translated.get(sql)
        if found is None:
            found = self._prepared.translate(sql, self._prepared_names)
            if len(self._translated) < CACHE_SIZE:
                self._translated[sql] = found
        return found

    @property
    def in_transaction(self) -> bool:
        """Whether the server may hold an open transaction of ours."""
        return self._open

    def begin(self) -> None:
        """Start a transaction; on PostgreSQL its BEGIN leaves with the first statement."""
        self._open = True
        self._server_open = False
        self._savepoint = False
        self._pending = ""
        # Listeners (tracing) see the claim's statements through SQLAlchemy's own path.
        self._traced = bool(self.connection.dispatch.before_cursor_execute)
        if self._traced or not self.pipelined:
            self._transaction = self.connection.begin()

    def savepoint(self, *, now: bool = False) -> None:
        """Start the next event's savepoint (on PostgreSQL: with the next statement).

        The previous event's savepoint is released first, so a delivery holds
        one savepoint at a time however many events it has. ``now``: send it at
        once, for work whose next statement does not go through the lane (a
        handler's, through the session).
        """
        release, self._savepoint = self._savepoint, True
        if self.pipelined:
            self._pending = (RELEASE + "; " if release else "") + SAVEPOINT + "; "
            if now:
                self.execute("")
            return
        if release:
            self.execute(RELEASE)
        self.execute(SAVEPOINT)

    def rollback_to_savepoint(self) -> None:
        """Undo everything since :meth:`savepoint`; the transaction goes on."""
        if self._pending:  # never sent: nothing ran since; the previous one (if any) stays
            self._savepoint = self._pending.startswith(RELEASE)
            self._pending = ""
            return
        self.execute(ROLLBACK_TO)

    def send_pending(self) -> None:
        """Send the savepoint statements waiting for the next statement, now (PostgreSQL).

        Called by the handler session before a statement that does not go through the
        lane (SQLAlchemy's own path), so that its work is inside the transaction and the
        event's savepoint.
        """
        if self._open and self._transaction is None:  # SQLAlchemy's path: join it
            connection = self.connection
            self._transaction = connection.get_transaction() or connection.begin()
        if self._pending or (self._open and not self._server_open):
            self.execute("")

    def joined(self) -> Connection:
        """The lane's connection for a statement of SQLAlchemy's own, inside the lane's
        transaction (its pending BEGIN and savepoint sent first)."""
        if self.pipelined:
            self.send_pending()
        return self.connection

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run ``sql`` on the lane (in the transaction); return something with ``fetchone``."""
        if self._prepared_names and not self._traced:
            sql = self._translate(sql)
        if self.pipelined:
            if not self._server_open:
                sql = self._begin + self._pending + sql
                self._server_open = True
            elif self._pending:
                sql = self._pending + sql
            self._pending = ""
        return self._run(sql, params)

    def execute_committing(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """PostgreSQL: run ``sql``, which commits the transaction itself.

        Statements after its ``COMMIT`` run in the message's own implicit transaction,
        committed when the message ends; what is returned holds the last one's rows.
        The lane's transaction goes on: its next statement begins a new one on the
        server, and a rollback before then has nothing to send.
        """
        result = self.execute(sql, params)
        self._server_open = False
        self._savepoint = False
        return result

    def _run(self, sql: str, params: Mapping[str, Any] | None) -> Any:
        if self._traced:
            return self.connection.exec_driver_sql(sql, dict(params or {}))
        if statement_log.isEnabledFor(logging.INFO):
            statement_log.info("%s\n[claim lane; parameters hidden]", sql)
        try:
            if params is None:
                self.cursor.execute(sql)
            else:
                self.cursor.execute(sql, params)
        except self._dialect.loaded_dbapi.Error as exc:
            raise self._wrap(exc, sql, params) from exc
        return self.cursor

    def run_text(self, session: ClaimSession, statement: TextClause, params: Any) -> Rows | None:
        """A handler's ``text()`` statement, straight on the cursor; None: not here.

        Only inside the claim's transaction (its pending BEGIN or savepoint leaves with it), for a
        dict of plain parameters naming every bound one, a session with nothing to flush,
        and no one listening to the engine's statements or logging them. Errors are
        SQLAlchemy's, as on its own path (a lost connection retires the idle lanes).
        """
        if not self._open or (params is not None and type(params) is not dict):
            return None
        sql = self._lanes_texts.get(statement)
        if sql is None:
            sql = self._compile_text(statement)
        if not sql or session.flushes():
            return None
        connection = self.connection
        dispatch = connection.dispatch
        if (
            dispatch.before_execute
            or dispatch.before_cursor_execute
            or dispatch.after_cursor_execute
            or dispatch.after_execute
            or session.dispatch.do_orm_execute
            or connection._echo
        ):
            return None
        names, text = sql
        values = params or {}
        if not names.issubset(values):
            return None  # SQLAlchemy's path says which value is missing
        cursor, pending = self.cursor, self._pending
        if not self._server_open:  # the transaction's BEGIN leaves with it
            text, self._server_open = self._begin + pending + text, True
            self._pending = ""
        elif pending:  # the event's savepoint leaves with it
            text, self._pending = pending + text, ""
        try:
            cursor.execute(text, values)
            description = cursor.description
            rows = cursor.fetchall() if description else []
        except self._dialect.loaded_dbapi.Error as exc:
            raise self._wrap(exc, text, values) from exc
        keys = [column[0] for column in description] if description else []
        return Rows(keys, rows, cursor.rowcount)

    def _compile_text(self, statement: TextClause) -> tuple[frozenset[str], str] | tuple[()]:
        """``statement``'s SQL and parameter names, or () where SQLAlchemy must bind them."""
        dialect = self._dialect
        compiled = statement.compile(dialect=dialect)
        plain = not statement._execution_options and not compiled.escaped_bind_names
        for bind in compiled.binds.values():
            if bind.expanding or bind.value is not None or bind.callable is not None:
                plain = False
            elif bind.type._cached_bind_processor(dialect) is not None:
                plain = False
        found: tuple[frozenset[str], str] | tuple[()] = (
            (frozenset(compiled.binds), compiled.string) if plain else ()
        )
        texts = self._lanes_texts
        if len(texts) < TEXT_CACHE_SIZE:
            texts[statement] = found
        return found

    def execute_alone(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """PostgreSQL: run ``sql`` as a transaction of its own, committed when this returns.

        One message, led by the ``SET LOCAL`` timeouts: PostgreSQL runs the
        statements of one message as one implicit transaction and commits it after
        the last (an error rolls all of them back), so there is no ``BEGIN`` or
        ``COMMIT`` to send and one round trip does it all. What is returned holds
        the last statement's rows.
        """
        if self._open or not self.pipelined:
            raise RuntimeError("execute_alone: PostgreSQL, outside a transaction only")
        self._traced = bool(self.connection.dispatch.before_cursor_execute)
        if self._prepared_names and not self._traced:
            sql = self._translate(sql)
        result = self._run(self._alone + sql, params)
        if self._traced and self.connection.in_transaction():
            # SQLAlchemy's path began its own bookkeeping transaction; the server's ended
            # with the message (the driver is in autocommit mode): end ours, or the lane's
            # next begin() would find it. The rows stay readable (the driver buffers them).
            self.connection.commit()
        return result

    def commit(self, sql: str | None = None, params: Mapping[str, Any] | None = None) -> None:
        """Run ``sql`` (if any), then commit; on PostgreSQL both leave in one message."""
        if self.pipelined:
            if self._server_open or sql:
                self.execute(f"{sql}; COMMIT" if sql else "COMMIT", params)
            self._server_open = False
        elif sql:
            self.execute(sql, params)
        transaction = self._transaction or self.connection.get_transaction()
        self._transaction, self._open = None, False
        if transaction is not None and transaction.is_active:
            transaction.commit()

    def rollback(self) -> None:
        """Roll back whatever the transaction did; never raises for a dead connection."""
        transaction = self._transaction or self.connection.get_transaction()
        self._transaction, self._open = None, False
        try:
            if self.pipelined and self._server_open and self.usable:
                self._server_open = False
                self.cursor.execute("ROLLBACK")
        except self._dialect.loaded_dbapi.Error as exc:
            self._wrap(exc, "ROLLBACK", None)  # invalidates the connection if it is gone
        finally:
            self._server_open = False
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
            if hard and not self.connection.invalidated:
                self.connection.invalidate()
            self.connection.close()

    def _wrap(self, exc: Exception, sql: str, params: Any) -> DBAPIError:
        """The DBAPIError SQLAlchemy would raise; a lost connection retires every idle lane."""
        disconnect = self._dialect.is_disconnect(exc, self.connection.connection, self.cursor)
        if getattr(exc, "pgcode", None) == MISSING and self._prepared_names:
            # This session lacks a statement prepared on the connection: a pooler hands
            # its transactions to other sessions. This transaction is lost whole; no more.
            self._prepared.disable(exc)
            self._prepared_names, self._translated = set(), {}
        elif getattr(exc, "pgcode", None) == STALE and self._prepared_names:
            self._stale_plans = True  # "cached plan must not change result type"
        if disconnect:
            if not self.connection.invalidated:
                self.connection.invalidate(exc)
            lanes = self._lanes()
            if lanes is not None:
                lanes.retire()
        wrapped = DBAPIError.instance(
            sql,
            params,
            exc,
            self._dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=disconnect,
            dialect=self._dialect,
        )
        if not isinstance(wrapped, DBAPIError):  # pragma: no cover (DBAPI errors only)
            raise TypeError(f"not a DBAPI error: {exc!r}")
        return wrapped


class Lanes:
    """The idle lanes of one engine: taken by a claim, given back when it ends.

    At most ``keep`` idle lanes are kept (the pool size: one per worker thread;
    0 in session-pooler mode, where each claim's connection goes straight back).
    A lane whose connection was lost, that is older than ``RECYCLE_SECONDS``, or
    that predates a disconnect seen anywhere on the engine (:meth:`retire`) is
    closed instead of kept. ``Engine.dispose()`` closes the idle lanes too.
    """

    def __init__(
        self,
        engine: Engine,
        keep: int,
        timeouts: Timeouts | None = None,
        *,
        prepare: bool = False,
    ) -> None:
        self.engine = engine
        self.keep = keep
        self.pipelined = engine.dialect.name == "postgresql"
        #: The statements each lane prepares on its connection (IDEMHOOK_PREPARED_STATEMENTS).
        self.prepared = Prepared(prepare and self.pipelined)
        #: Lane.run_text's compiled statements (a dict: its reads and writes are atomic).
        self.texts: dict[TextClause, tuple[frozenset[str], str] | tuple[()]] = {}
        #: What the first statement of each transaction is prefixed with (PostgreSQL).
        self.begin_sql = "BEGIN; " + (f"{timeouts.sql}; " if timeouts else "")
        #: The same for a transaction of one message (:meth:`Lane.execute_alone`).
        self.alone_sql = f"{timeouts.sql}; " if timeouts else ""
        #: Bumped by every disconnect and dispose: lanes of older generations are closed.
        self.generation = 0
        self._idle: list[Lane] = []
        # The hooks hold this object weakly: a lane's connection holds the engine, so a
        # strong reference from the engine back here would keep all of it alive.
        me = weakref.ref(self)
        event.listen(engine, "engine_disposed", lambda _engine: _call(me, "close"))
        event.listen(engine, "handle_error", lambda context: _on_error(me, context))
        # At exit, or when the app is dropped, the kept connections go back to the pool
        # (which closes them) instead of being reclaimed, with a warning, by the collector.
        weakref.finalize(self, _give_back, self._idle)

    @contextmanager
    def lane(self) -> Iterator[Lane]:
        """A lane for one claim (its transaction is the caller's to begin and end)."""
        lane = self._take()
        try:
            yield lane
        finally:
            self._give(lane)

    def _take(self) -> Lane:
        while True:
            try:
                lane = self._idle.pop()  # atomic: threads never share a lane
            except IndexError:
                return self._open()
            if lane.pid != os.getpid():
                # Inherited through a fork (app.db points its socket at /dev/null).
                inherited_connections.append(lane)
                continue
            if lane.generation != self.generation or not lane.usable or lane._stale_plans:
                lane.close(hard=True)
                continue
            if lane._prepared_version != self.prepared.version:
                self._prepare(lane)
            return lane

    def _give(self, lane: Lane) -> None:
        if lane.in_transaction:  # the caller's error path did not end it: never reuse it
            lane.rollback()
        if lane.generation != self.generation or not lane.usable or lane._stale_plans:
            lane.close(hard=True)
        elif len(self._idle) < self.keep and time.monotonic() - lane.opened < RECYCLE_SECONDS:
            self._idle.append(lane)
        else:
            lane.close()

    def retire(self) -> None:
        """Close every idle lane: a disconnect means the others are probably dead too."""
        self.generation += 1
        _drain(self._idle, hard=True)

    def close(self) -> None:
        """Close every idle lane's connection (lanes in use: when they are given back)."""
        self.retire()

    def _open(self) -> Lane:
        connection = self.engine.connect()
        try:
            options: dict[str, Any] = {LANE_OPTION: True}
            if self.pipelined:
                options["isolation_level"] = "AUTOCOMMIT"
            connection = connection.execution_options(**options)
            session = ClaimSession(bind=connection, expire_on_commit=False)
            lane = Lane(self, connection, session)
        except BaseException:
            connection.close()
            raise
        if self.prepared.enabled:
            self._prepare(lane)
        return lane

    def _prepare(self, lane: Lane) -> None:
        try:
            lane.prepare()
        except BaseException:
            lane.close(hard=True)
            raise


def _call(ref: weakref.ref[Lanes], method: str) -> None:
    alive = ref()
    if alive is not None:
        getattr(alive, method)()


def _on_error(ref: weakref.ref[Lanes], context: Any) -> None:
    # Any statement of the engine (a handler's, the read API's) that met a lost connection.
    if context.is_disconnect:
        _call(ref, "retire")


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
        else:
            inherited_connections.append(lane)
