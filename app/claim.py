"""The claim: record an event's ID and apply its handlers in one transaction.

For each event: ``INSERT ... ON CONFLICT (source, event_id) DO UPDATE SET
duplicate_count = duplicate_count + 1`` with ``RETURNING``. A returned
``duplicate_count`` of 0 means this transaction inserted the row: run the
handlers in the same transaction, store their result, commit. Anything else
means the event was already applied: the duplicate is counted and nothing runs.

A concurrent duplicate blocks on the unique index until the first transaction
ends: after a commit it is a duplicate, after a rollback it inserts and runs.
The per-statement and lock timeouts (``IDEMHOOK_STATEMENT_TIMEOUT_MS``) bound
that wait and any handler stuck in the database.

A batch runs in one transaction with a savepoint per event, so one event's
failure rolls back only its own claim and effects.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, insert, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .db import Database, dumps, is_disconnect
from .errors import ServiceUnavailable
from .models import delivery_failures, processed_events
from .plugins import Event, Registry, result_of

log = logging.getLogger("idemhook.events")

# Header names never copied into delivery_failures.headers.
_SECRET_HEADER_PARTS = ("signature", "authorization", "cookie", "hmac", "token", "secret", "-sig")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one event; ``status`` is processed, duplicate, ignored or failed."""

    event_id: str
    status: str
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"event_id": self.event_id, "status": self.status}
        if self.status == "failed":
            body["error"] = self.error
        else:
            body["result"] = self.result
        return body


class ClaimSession(Session):
    """The session handlers get: it refuses to end the claim's transaction for them."""

    in_handler = False

    def _refuse(self, what: str) -> None:
        if self.in_handler:
            raise RuntimeError(
                f"a handler must not {what} the session: the receiver commits the claim and "
                "every handler's work together (see app.plugins)"
            )

    def commit(self) -> None:
        self._refuse("commit")
        super().commit()

    def rollback(self) -> None:
        self._refuse("roll back")
        super().rollback()

    def close(self) -> None:
        self._refuse("close")
        super().close()


class _HandlerError(Exception):
    """A handler (or storing its result) raised; ``__cause__`` is what it raised."""

    def __init__(self, handler_name: str) -> None:
        super().__init__(handler_name)
        self.handler_name = handler_name


class _DriverStatement:
    """A Core statement compiled once to the driver's SQL, run with ``exec_driver_sql``.

    The claim's two statements run for every event; skipping the ORM and Core
    execution layers (compile cache, bind and result processing) for them was
    the largest CPU saving in the profile (docs/performance.md). JSON values are
    serialised with the engine's own serializer, so what is stored is unchanged.
    """

    def __init__(self, statement: Any, dialect: Any, json_params: tuple[str, ...]) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.fixed = {k: v for k, v in compiled.params.items() if v is not None}
        self.json_params = json_params

    def execute(self, session: Session, params: dict[str, Any], prefix: str = "") -> Any:
        for key in self.json_params:
            params[key] = dumps(params[key])
        connection = session.bind
        if not isinstance(connection, Connection):  # a session on the engine itself
            connection = session.connection()
        return connection.exec_driver_sql(prefix + self.sql, {**self.fixed, **params})


class _ClaimRow(NamedTuple):
    duplicate_count: int
    status: str
    result: Any


def _raw_execute(connection: Connection, sql: str, params: Any) -> tuple[Any, ...] | None:
    """Run ``sql`` on the DBAPI cursor itself; errors come out as SQLAlchemy's would.

    For the pipelined path's few fixed statements, SQLAlchemy's execution context and
    result objects cost more CPU than the statements' own Python work
    (docs/performance.md). A lost connection is invalidated as SQLAlchemy would do,
    so ``is_disconnect`` and the retry in ``Claimer.apply`` behave the same.
    """
    dbapi_connection = connection.connection.dbapi_connection
    dialect = connection.dialect
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() if cursor.description else None
    except dialect.loaded_dbapi.Error as exc:
        invalidated = dialect.is_disconnect(exc, dbapi_connection, None)
        if invalidated:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            sql,
            params,
            exc,
            dialect.loaded_dbapi.Error,
            hide_parameters=True,  # never a payload in an error message or a log
            connection_invalidated=invalidated,
            dialect=dialect,
        ) from exc


class _Pipelined:
    """A PostgreSQL transaction whose BEGIN and COMMIT travel with its first and last statement.

    psycopg2 sends BEGIN and COMMIT as statements of their own: two of the five
    round trips of a new event. With the connection in autocommit mode the claim
    sends ``BEGIN; INSERT ...`` and the end sends ``UPDATE ...; COMMIT``; results
    are kept until then (``finished``). A transaction that only counted
    duplicates commits without waiting for the WAL flush: losing the last few
    duplicate counts in a crash loses no event (docs/performance.md).
    """

    __slots__ = ("connection", "begin", "finished", "committed")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.begin = "BEGIN; "
        self.finished: list[dict[str, Any]] = []
        self.committed = False


class Claimer:
    """Applies events exactly once against one database with one handler registry."""

    def __init__(
        self,
        database: Database,
        registry: Registry,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.database = database
        self.registry = registry
        #: Called after each event with (event, outcome, seconds); logging and metrics.
        self.observers: list[Observer] = [log_outcome, *observers]
        self.sessions = sessionmaker(database.engine, class_=ClaimSession, expire_on_commit=False)
        dialect = database.engine.dialect.name
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        table = processed_events
        stmt = dialect_insert(table).values(
            source=bindparam("source"),
            event_id=bindparam("event_id"),
            event_type=bindparam("event_type"),
            status=bindparam("status"),
            received_at=bindparam("received_at"),
            payload=bindparam("payload", type_=table.c.payload.type),
            duplicate_count=0,
            last_seen_at=bindparam("received_at"),
        )
        self._claim = stmt.on_conflict_do_update(
            index_elements=[table.c.source, table.c.event_id],
            set_={
                "duplicate_count": table.c.duplicate_count + 1,
                "last_seen_at": stmt.excluded.last_seen_at,
            },
        ).returning(table.c.duplicate_count, table.c.status, table.c.result)
        self._finish = (
            update(table)
            .where(table.c.source == bindparam("b_source"), table.c.event_id == bindparam("b_id"))
            .values(
                result=bindparam("result", type_=table.c.result.type),
                processed_at=bindparam("processed_at"),
            )
        )
        # PostgreSQL (production) takes the driver-level path; SQLite keeps Core execution.
        self._claim_sql: _DriverStatement | None = None
        self._finish_sql: _DriverStatement | None = None
        if dialect == "postgresql":
            engine_dialect = database.engine.dialect
            self._claim_sql = _DriverStatement(self._claim, engine_dialect, ("payload",))
            self._finish_sql = _DriverStatement(self._finish, engine_dialect, ("result",))

    def apply(self, events: Sequence[Event], raw_body: bytes) -> list[Outcome]:
        """Claim and handle ``events``; retry once on a lost connection, else 503."""
        try:
            return self._apply(events, raw_body)
        except ServiceUnavailable:
            raise
        except SQLAlchemyError as exc:
            if not is_disconnect(exc):
                raise
        # The connection died (database restart): nothing was committed, or the
        # commit landed and the retry will find duplicates. Either way retrying is safe.
        try:
            return self._apply(events, raw_body)
        except SQLAlchemyError as exc:
            if is_disconnect(exc):
                raise _unavailable() from exc
            raise

    def _apply(self, events: Sequence[Event], raw_body: bytes) -> list[Outcome]:
        if len(events) > 1:
            # Optimistic pass: the whole batch in one transaction without savepoints
            # (two fewer round trips per event). If any handler fails, that pass is
            # rolled back whole and the batch runs again with a savepoint per event,
            # so the database ends up exactly as if savepoints had been used throughout.
            try:
                return self._run(events, raw_body, savepoints=False)
            except _HandlerError as exc:
                if is_disconnect(exc.__cause__):
                    raise exc.__cause__ from None  # let apply() retry or answer 503
            return self._run(events, raw_body, savepoints=True)
        started = time.perf_counter()
        try:
            return self._run(events, raw_body, savepoints=False)
        except _HandlerError as exc:
            if is_disconnect(exc.__cause__):
                raise exc.__cause__ from None  # let apply() retry or answer 503
            outcomes = [self._failed(events[0], exc)]
            self._observe(events[0], outcomes[0], time.perf_counter() - started)
            self._record_failure_apart(events[0], exc, raw_body)
            return outcomes

    def _run(self, events: Sequence[Event], raw_body: bytes, *, savepoints: bool) -> list[Outcome]:
        """Claim ``events`` in one transaction on a Core connection; observe after it ends.

        Handlers get a :class:`ClaimSession` joined to that connection's transaction;
        the transaction itself is driven at the Core level, which costs far less per
        request than the ORM's session transaction (docs/performance.md).
        """
        outcomes: list[Outcome] = []
        observed: list[tuple[Event, Outcome, float]] = []
        connection = self.database.engine.connect()
        tx: _Pipelined | None = None
        if self._claim_sql is not None and not savepoints:
            raw = connection.connection.dbapi_connection
            raw.autocommit = True  # BEGIN and COMMIT are ours to send (see _Pipelined)
            tx = _Pipelined(connection)
        session = self.sessions(bind=connection, join_transaction_mode="rollback_only")
        try:
            with connection.begin():
                for event in events:
                    started = time.perf_counter()
                    if savepoints:
                        outcome = self._claim_in_savepoint(connection, event, raw_body)
                    else:
                        outcome = self._claim_one(session, event, tx)
                    outcomes.append(outcome)
                    observed.append((event, outcome, time.perf_counter() - started))
                if tx is not None:
                    try:
                        self._commit(connection, tx, outcomes)
                    except DBAPIError as exc:
                        if is_disconnect(exc) or not tx.finished:
                            raise
                        # PostgreSQL refused a stored result (JSONB has no Infinity): the
                        # handler's fault, as when the result was stored right after it ran.
                        # A batch then reruns with savepoints, which names the event.
                        raise _HandlerError(tx.finished[-1]["handler"]) from exc
        finally:
            session.close()
            if tx is not None:
                self._end_pipelined(connection, raw, tx)
            connection.close()
        for item in observed:
            self._observe(*item)
        return outcomes

    def _claim_in_savepoint(self, connection: Connection, event: Event, raw_body: bytes) -> Outcome:
        """One event of a batch in its own savepoint (and session): a failure undoes only it."""
        # rollback_only: closing this session must not undo the event's savepoint.
        session = self.sessions(bind=connection, join_transaction_mode="rollback_only")
        savepoint = connection.begin_nested()
        try:
            outcome = self._claim_one(session, event)
        except _HandlerError as exc:
            if is_disconnect(exc.__cause__):
                raise exc.__cause__ from None
            session.close()
            savepoint.rollback()
            self._record_failure(connection, event, exc, raw_body)
            return self._failed(event, exc)
        finally:
            session.close()
        savepoint.commit()
        return outcome

    def _observe(self, event: Event, outcome: Outcome, seconds: float) -> None:
        for observer in self.observers:
            observer(event, outcome, seconds)

    def _commit(self, connection: Connection, tx: _Pipelined, outcomes: list[Outcome]) -> None:
        """Store the kept results and commit, in one round trip."""
        finished = tx.finished
        if len(finished) == 1:
            assert self._finish_sql is not None
            item = {k: v for k, v in finished[0].items() if k not in ("value", "handler")}
            _raw_execute(
                connection, self._finish_sql.sql + "; COMMIT", {**self._finish_sql.fixed, **item}
            )
        elif finished:
            # A batch: every result in one UPDATE ... FROM VALUES.
            rows = ", ".join(["(%s, %s, %s::jsonb, %s::timestamptz)"] * len(finished))
            params: list[Any] = []
            for item in finished:
                params += [item["b_source"], item["b_id"], item["result"], item["processed_at"]]
            _raw_execute(
                connection,
                f"UPDATE {processed_events.name} AS p SET result = v.result, "
                f"processed_at = v.processed_at FROM (VALUES {rows}) "
                "AS v(source, event_id, result, processed_at) "
                "WHERE p.source = v.source AND p.event_id = v.event_id; COMMIT",
                tuple(params),
            )
        elif all(outcome.status == "duplicate" for outcome in outcomes):
            _raw_execute(connection, "SET LOCAL synchronous_commit TO OFF; COMMIT", None)
        else:
            _raw_execute(connection, "COMMIT", None)
        tx.committed = True

    @staticmethod
    def _end_pipelined(connection: Connection, raw: Any, tx: _Pipelined) -> None:
        """Roll back what did not commit and hand the connection back in its usual mode."""
        if connection.invalidated or raw.closed:
            return  # the pool discards it
        if not tx.committed and not tx.begin:
            try:
                _raw_execute(connection, "ROLLBACK", None)
            except SQLAlchemyError:
                return  # invalidated by the failure: the pool discards it
        raw.autocommit = False

    def _claim_one(
        self,
        session: ClaimSession,
        event: Event,
        tx: _Pipelined | None = None,
    ) -> Outcome:
        registrations = self.registry.for_event(event.source, event.type)
        claim = {
            "source": event.source,
            "event_id": event.id,
            "event_type": event.type,
            "status": "processed" if registrations else "ignored",
            "received_at": event.received_at,
            "payload": event.payload,
        }
        try:
            if tx is not None:
                assert self._claim_sql is not None
                begin, tx.begin = tx.begin, ""
                for key in self._claim_sql.json_params:
                    claim[key] = dumps(claim[key])
                found = _raw_execute(
                    tx.connection, begin + self._claim_sql.sql, {**self._claim_sql.fixed, **claim}
                )
                assert found is not None  # RETURNING always answers one row
                row = _ClaimRow(*found)
            elif self._claim_sql is not None:
                row = self._claim_sql.execute(session, claim).one()
            else:
                row = session.execute(self._claim, claim).one()
        except DBAPIError as exc:
            if _is_timeout(exc) and not is_disconnect(exc):
                raise ServiceUnavailable(
                    f"Event {event.id!r} is being processed by another delivery right now; "
                    "retry shortly.",
                    code="event_in_progress",
                ) from exc
            raise
        if row.duplicate_count:
            if tx is not None:  # a repeat inside this batch: its original's result is kept
                for item in tx.finished:
                    if item["b_id"] == event.id:
                        return Outcome(event.id, "duplicate", item["value"])
            return Outcome(event.id, "duplicate", row.result)
        if not registrations:
            return Outcome(event.id, "ignored", None)

        results: dict[str, Any] = {}
        name = registrations[0].name
        try:
            session.in_handler = True
            try:
                for registration in registrations:
                    name = registration.name
                    results[name] = registration.func(event, session)
                # The receiver, not the session, commits: write out pending ORM changes.
                session.flush()
            finally:
                session.in_handler = False
            result = result_of(results)
            finish = {
                "b_source": event.source,
                "b_id": event.id,
                "result": result,
                "processed_at": datetime.now(UTC),
            }
            if tx is not None:
                finish["result"] = dumps(result)  # serialise now: a bad result fails this event
                tx.finished.append({**finish, "value": result, "handler": name})
            elif self._finish_sql is not None:
                self._finish_sql.execute(session, finish)
            else:
                session.execute(self._finish, finish)
        except Exception as exc:  # anything a plugin raises fails this event, retryably
            raise _HandlerError(name) from exc
        return Outcome(event.id, "processed", result)

    @staticmethod
    def _failed(event: Event, exc: _HandlerError) -> Outcome:
        cause = exc.__cause__
        return Outcome(
            event.id, "failed", error=f"{exc.handler_name} raised {type(cause).__name__}"
        )

    def _record_failure(
        self, session: Session | Connection, event: Event, exc: _HandlerError, raw_body: bytes
    ) -> None:
        cause = exc.__cause__ or exc
        session.execute(
            insert(delivery_failures),
            {
                "source": event.source,
                "event_id": event.id,
                "event_type": event.type,
                "error": f"{exc.handler_name} raised {type(cause).__name__}: {cause}"[:4000],
                "traceback": "".join(traceback.format_exception(cause))[-20000:],
                "raw_body": raw_body,
                "payload": event.payload,
                "headers": _safe_headers(event),
                "permanent": False,
                "failed_at": datetime.now(UTC),
            },
        )

    def _record_failure_apart(self, event: Event, exc: _HandlerError, raw_body: bytes) -> None:
        """Write the failure in its own transaction (the event's own one was rolled back)."""
        session = self.sessions()
        try:
            with session.begin():
                self._record_failure(session, event, exc, raw_body)
        except SQLAlchemyError as db_exc:
            if is_disconnect(db_exc):
                raise _unavailable() from db_exc
            raise
        finally:
            session.close()


def _is_timeout(exc: DBAPIError) -> bool:
    # 55P03 lock_not_available, 57014 query_canceled (statement_timeout).
    return getattr(exc.orig, "pgcode", None) in ("55P03", "57014")


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The database is unavailable; nothing was recorded. Retry shortly.",
        code="database_unavailable",
    )


def _safe_headers(event: Event) -> dict[str, str]:
    return {
        name: value
        for name, value in event.headers.items()
        if not any(part in name.lower() for part in _SECRET_HEADER_PARTS)
    }


Observer = Callable[[Event, Outcome, float], None]


def log_outcome(event: Event, outcome: Outcome, seconds: float) -> None:
    """One log line per event; never the payload, headers or signature."""
    log.info(
        "%s %s %s %s",
        event.source,
        event.id,
        event.type,
        outcome.status,
        extra={
            "source": event.source,
            "event_id": event.id,
            "event_type": event.type,
            "outcome": outcome.status,
            "duration_ms": round(seconds * 1000, 2),
        },
    )
