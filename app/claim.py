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

A batch runs in one transaction. It is first tried optimistically, without
savepoints, storing every event's result in one statement at the end (the
savepoints and per-event result ``UPDATE`` were most of a batch's round trips,
see docs/performance.md). If any handler fails or rejects, that pass is rolled
back whole and the batch runs again with a savepoint per event, so one event's
failure rolls back only its own claim and effects: the database ends up exactly
as if savepoints had been used throughout. (The other events' handlers then run
twice, the first run rolled back, as in any redelivery.)

Every claim runs on a lane (:mod:`app.lanes`): a kept connection with its
cursor and the handlers' session. The claim's own statements are compiled once
from Core (:class:`_Statements`) and run on the cursor; on PostgreSQL ``BEGIN``
travels with the claim ``INSERT`` and ``COMMIT`` with the statement that stores
the results, so a single new event costs three round trips: the claim, the
handler's statements, the result with the commit.

A handler's ``Reject`` rolls back the event's effects like a failure, then
records the claim as ``rejected`` (with a permanent ``delivery_failures`` row)
so that the provider stops retrying and redeliveries are duplicates.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    bindparam,
    cast,
    column,
    insert,
    literal_column,
    update,
    values,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .db import Database, dumps, is_disconnect
from .errors import ServiceUnavailable
from .lanes import Lane, Lanes
from .models import delivery_failures, processed_events
from .plugins import Event, Ignore, Registry, Reject, result_of

# Header names never copied into delivery_failures.headers.
_SECRET_HEADER_PARTS = ("signature", "authorization", "cookie", "hmac", "token", "secret", "-sig")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one event: processed, duplicate, ignored, rejected or failed."""

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


class _Rejected(Exception):
    """A handler returned or raised ``Reject``: roll back its effects, keep the claim."""

    def __init__(self, handler_name: str, reject: Reject) -> None:
        super().__init__(handler_name)
        self.handler_name = handler_name
        self.reason = reject.reason
        self.reject = reject


@dataclass(slots=True)
class _Deferred:
    """What the savepoint-free pass keeps back until its transaction commits.

    ``stored``: each processed or ignored event's result row, written by one
    statement sent with the COMMIT (:meth:`_Statements.store`; PostgreSQL).
    ``timings`` and ``observed``: timer and observer calls, made only if the
    pass commits, so a batch that falls back to savepoints is not reported twice.
    """

    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: list[tuple[Event, str, float]] = field(default_factory=list)
    observed: list[tuple[Event, Outcome, float]] = field(default_factory=list)


class _RetryWithSavepoints(Exception):
    """The savepoint-free batch pass failed on one event: rerun the batch with savepoints."""


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
        self.observers: list[Observer] = list(observers)
        #: Called with (event, phase, seconds) for phase "claim" (the INSERT, including
        #: any wait on a concurrent delivery of the same event) and "handlers".
        self.timers: list[Timer] = []
        engine = database.engine
        #: Sessions outside the claim (replay); the claim itself runs on lanes.
        self.sessions = sessionmaker(engine, class_=ClaimSession, expire_on_commit=False)
        self.lanes = Lanes(
            engine,
            lambda connection: ClaimSession(bind=connection, expire_on_commit=False),
            keep=_pool_size(engine),
        )
        self._statements = _Statements(engine.dialect)
        self._postgresql = engine.dialect.name == "postgresql"

    def apply(self, events: Sequence[Event], raw_body: bytes) -> list[Outcome]:
        """Claim and handle ``events``; retry once on a lost connection, else 503."""
        try:
            return self._apply(events, raw_body)
        except ServiceUnavailable:
            raise
        except SQLAlchemyError as exc:
            if not is_disconnect(exc):
                raise
        # The connection died before any handler ran (a pooled connection that did not
        # survive a database restart) or at the commit: nothing was committed, or the
        # commit landed and the retry finds duplicates. Either way retrying is safe.
        # A connection lost while handlers ran is answered 503 at once (see above):
        # running them again in the same request would only double their outside effects.
        try:
            return self._apply(events, raw_body)
        except SQLAlchemyError as exc:
            if is_disconnect(exc):
                raise _unavailable() from exc
            raise

    def _apply(self, events: Sequence[Event], raw_body: bytes) -> list[Outcome]:
        with self.lanes.lane() as lane:
            try:
                return self._apply_without_savepoints(lane, events, raw_body)
            except _RetryWithSavepoints:
                pass  # rolled back whole: nothing it did remains or was reported
            return self._apply_with_savepoints(lane, events, raw_body)

    def _apply_without_savepoints(
        self, lane: Lane, events: Sequence[Event], raw_body: bytes
    ) -> list[Outcome]:
        """Claim the events in one transaction without savepoints.

        A single event's failure or rejection is final here (its own transaction
        is rolled back and the failure recorded apart). A batch raises
        ``_RetryWithSavepoints`` instead, leaving that event to the savepoint pass.
        Per event of a batch that saves ``SAVEPOINT``, ``RELEASE`` and the result
        ``UPDATE``; the results are stored by one statement, sent with the COMMIT.
        """
        batch = len(events) > 1
        started = time.perf_counter()
        deferred = _Deferred()
        outcomes: list[Outcome] = []
        lane.begin()
        try:
            for event in events:
                event_started = time.perf_counter()
                outcome = self._claim_one(lane, event, deferred)
                outcomes.append(outcome)
                deferred.observed.append((event, outcome, time.perf_counter() - event_started))
            lane.commit(*self._closing_statement(outcomes, list(deferred.stored.values())))
        except BaseException as exc:
            lane.rollback()
            lane.session.close()
            if isinstance(exc, _HandlerError):
                if is_disconnect(exc.__cause__):
                    # Handlers already ran: answer 503 rather than run them again here.
                    raise _unavailable() from exc.__cause__
                if batch:
                    raise _RetryWithSavepoints from exc
                self._report_timings(deferred)  # a single event: this was its only pass
                event = events[0]
                outcome = self._failed(event, exc)
                self._observe(event, outcome, time.perf_counter() - started)
                self._apart(lane, self._record_failure, event, exc, raw_body)
                return [outcome]
            if isinstance(exc, _Rejected):
                if batch:
                    raise _RetryWithSavepoints from exc
                self._report_timings(deferred)
                outcome = self._apart(lane, self._reject, events[0], exc, raw_body)
                self._observe(events[0], outcome, time.perf_counter() - started)
                return [outcome]
            if isinstance(exc, DBAPIError) and batch and not is_disconnect(exc):
                # A statement PostgreSQL refused: typically a handler that swallowed an
                # error and left the transaction aborted. The savepoint pass finds the
                # event at fault and fails only it.
                raise _RetryWithSavepoints from exc
            raise
        finally:
            lane.session.close()
        self._report_timings(deferred)
        for observed in deferred.observed:
            self._observe(*observed)
        return outcomes

    def _apply_with_savepoints(
        self, lane: Lane, events: Sequence[Event], raw_body: bytes
    ) -> list[Outcome]:
        """Claim a batch with a savepoint per event: a failure rolls back only its event."""
        outcomes: list[Outcome] = []
        lane.begin()
        try:
            lane.ensure_begun()
            for event in events:
                started = time.perf_counter()
                savepoint = lane.connection.begin_nested()
                try:
                    outcome = self._claim_one(lane, event)
                    if lane.session.in_transaction():
                        lane.session.commit()  # releases the session's own savepoint
                    savepoint.commit()
                except (_HandlerError, _Rejected) as exc:
                    lane.session.close()
                    if isinstance(exc, _HandlerError) and is_disconnect(exc.__cause__):
                        raise _unavailable() from exc.__cause__
                    savepoint.rollback()
                    if isinstance(exc, _HandlerError):
                        outcome = self._failed(event, exc)
                        self._record_failure(lane, event, exc, raw_body)
                    else:
                        # The savepoint took the claim and the effects; claim it as rejected.
                        outcome = self._reject(lane, event, exc, raw_body)
                outcomes.append(outcome)
                self._observe(event, outcome, time.perf_counter() - started)
            lane.commit(*self._closing_statement(outcomes, []))
        except BaseException:
            lane.rollback()
            raise
        finally:
            lane.session.close()
        return outcomes

    def _closing_statement(
        self, outcomes: list[Outcome], stored: list[dict[str, Any]]
    ) -> tuple[str | None, dict[str, Any] | None]:
        """The statement sent with the COMMIT: the results to store, or none.

        A transaction that only counted duplicates changes nothing but
        ``duplicate_count`` and ``last_seen_at``. With ``synchronous_commit`` off
        for it, PostgreSQL answers the commit before the WAL reaches the disk: a
        crash in the next fraction of a second can lose those counts, never an
        event, a result or a failure (docs/guarantees.md), and the duplicate path
        no longer waits for a disk flush.
        """
        if stored:
            return self._statements.store(stored)
        if self._postgresql and outcomes and all(o.status == "duplicate" for o in outcomes):
            return "SET LOCAL synchronous_commit TO OFF", None
        return None, None

    def _apart(self, lane: Lane, write: Callable[..., Any], *args: Any) -> Any:
        """Run ``write`` in a transaction of its own (the event's own one was rolled back)."""
        lane.begin()
        try:
            lane.ensure_begun()
            result = write(lane, *args)
            lane.commit()
            return result
        except SQLAlchemyError as db_exc:
            lane.rollback()
            if is_disconnect(db_exc):
                raise _unavailable() from db_exc
            raise
        except BaseException:
            lane.rollback()
            raise

    def _report_timings(self, deferred: _Deferred) -> None:
        for timing in deferred.timings:
            self._time(*timing)

    def _observe(self, event: Event, outcome: Outcome, seconds: float) -> None:
        for observer in self.observers:
            observer(event, outcome, seconds)

    def _time(
        self, event: Event, phase: str, seconds: float, deferred: _Deferred | None = None
    ) -> None:
        if deferred is not None:
            deferred.timings.append((event, phase, seconds))
            return
        for timer in self.timers:
            timer(event, phase, seconds)

    def _claim_row(self, lane: Lane, event: Event, status: str) -> tuple[Any, ...]:
        """Run the claim statement; return (id, duplicate_count, status, result)."""
        try:
            return self._statements.claim(lane, event, status)
        except DBAPIError as exc:
            if _is_timeout(exc) and not is_disconnect(exc):
                raise ServiceUnavailable(
                    f"Event {event.id!r} is being processed by another delivery right now; "
                    "retry shortly.",
                    code="event_in_progress",
                ) from exc
            raise

    def _claim_one(self, lane: Lane, event: Event, deferred: _Deferred | None = None) -> Outcome:
        """Claim ``event`` and run its handlers; ``deferred``: store the result at the commit."""
        claim_started = time.perf_counter()
        registrations = self.registry.for_event(event.source, event.type)
        row_id, duplicates, _status, stored_result = self._claim_row(
            lane, event, "processed" if registrations else "ignored"
        )
        self._time(event, "claim", time.perf_counter() - claim_started, deferred)
        if duplicates:
            if deferred is not None and event.id in deferred.stored:
                # A repeat inside this batch: its original's result is not stored yet.
                return Outcome(event.id, "duplicate", deferred.stored[event.id]["value"])
            return Outcome(event.id, "duplicate", stored_result)
        if not registrations:
            return Outcome(event.id, "ignored", None)

        session = lane.session
        results: dict[str, Any] = {}
        ignored = 0
        name = registrations[0].name
        try:
            session.in_handler = True
            handlers_started = time.perf_counter()
            try:
                for registration in registrations:
                    name = registration.name
                    try:
                        value = registration.func(event, session)
                    except (Ignore, Reject) as chosen:  # raised from deep inside a handler
                        value = chosen
                    if isinstance(value, Reject):
                        raise _Rejected(name, value)
                    if isinstance(value, Ignore):
                        ignored += 1
                        value = value.result()
                    results[name] = value
            finally:
                self._time(event, "handlers", time.perf_counter() - handlers_started, deferred)
                session.in_handler = False
            status = "ignored" if ignored == len(registrations) else "processed"
            result = result_of(results)
            # Serialised now, so a result that JSON cannot hold fails its own event.
            stored = self._statements.result_row(row_id, status, result)
            if session.in_transaction():
                session.flush()  # the handlers' ORM writes: a failure here is this event's
            if deferred is None or not self._postgresql:
                self._statements.store_one(lane, stored)
            else:  # sent with the COMMIT (one statement for a whole batch)
                deferred.stored[event.id] = stored
        except _Rejected:
            raise
        except Exception as exc:  # anything a plugin raises fails this event, retryably
            raise _HandlerError(name) from exc
        return Outcome(event.id, status, result)

    def _reject(self, lane: Lane, event: Event, exc: _Rejected, raw_body: bytes) -> Outcome:
        """Claim ``event`` as rejected (its effects are already rolled back)."""
        row_id, duplicates, _status, stored_result = self._claim_row(lane, event, "rejected")
        if duplicates:  # another delivery claimed it while ours rolled back
            return Outcome(event.id, "duplicate", stored_result)
        result = exc.reject.result()
        self._statements.store_one(lane, self._statements.result_row(row_id, "rejected", result))
        self._record_failure(lane, event, exc, raw_body)
        return Outcome(event.id, "rejected", result)

    @staticmethod
    def _failed(event: Event, exc: _HandlerError) -> Outcome:
        cause = exc.__cause__
        return Outcome(
            event.id, "failed", error=f"{exc.handler_name} raised {type(cause).__name__}"
        )

    def _record_failure(
        self, lane: Lane, event: Event, exc: _HandlerError | _Rejected, raw_body: bytes
    ) -> None:
        if isinstance(exc, _Rejected):
            cause: BaseException = exc.reject
            error = f"{exc.handler_name} rejected the event: {exc.reason}"
        else:
            cause = exc.__cause__ or exc
            error = f"{exc.handler_name} raised {type(cause).__name__}: {cause}"
        lane.connection.execute(
            insert(delivery_failures),
            {
                "source": event.source,
                "event_id": event.id,
                "event_type": event.type,
                "error": error[:4000],
                "traceback": "".join(traceback.format_exception(cause))[-20000:],
                "raw_body": raw_body,
                "payload": event.payload,
                "headers": _safe_headers(event),
                "permanent": isinstance(exc, _Rejected),
                "failed_at": datetime.now(UTC),
            },
        )


class _Statements:
    """The claim's statements, built from Core and compiled once for one dialect.

    They run on a lane's DBAPI cursor (:mod:`app.lanes`), so values are passed
    the way SQLAlchemy's own types would pass them: JSON as text serialised by
    :func:`app.db.dumps`, timestamps through the dialect's bind processor.
    """

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        table = processed_events
        dialect_insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        stmt = dialect_insert(table).values(
            source=bindparam("source", type_=String),
            event_id=bindparam("event_id", type_=String),
            event_type=bindparam("event_type", type_=String),
            status=bindparam("status", type_=String),
            received_at=bindparam("received_at", type_=String),
            payload=bindparam("payload", type_=String),
            duplicate_count=literal_column("0"),
            replay_count=literal_column("0"),
            last_seen_at=bindparam("received_at", type_=String),
        )
        claim = stmt.on_conflict_do_update(
            index_elements=[table.c.source, table.c.event_id],
            set_={
                "duplicate_count": table.c.duplicate_count + literal_column("1"),
                "last_seen_at": stmt.excluded.last_seen_at,
            },
        ).returning(table.c.id, table.c.duplicate_count, table.c.status, table.c.result)
        self.claim_sql = self._compile(claim)
        finish = (
            update(table)
            .where(table.c.id == bindparam("row_id", type_=Integer))
            .values(
                status=bindparam("status", type_=String),
                result=bindparam("result", type_=String),
                processed_at=bindparam("processed_at", type_=String),
            )
        )
        self.finish_sql = self._compile(finish)
        self._timestamp = _processor(table.c.received_at.type, dialect, bind=True)
        self._result = _processor(table.c.result.type, dialect, bind=False)
        self._store_many: dict[int, str] = {}  # see store_many_sql

    def _compile(self, statement: Any, names: Collection[str] = frozenset()) -> str:
        compiled = statement.compile(dialect=self.dialect)
        # Every value is passed at run time by name: a literal or a column default
        # compiled in as a parameter would be missing from what the cursor is given.
        unnamed = [name for name in compiled.params if name not in (names or _PARAMETERS)]
        assert not unnamed, f"parameters {unnamed} would not be passed: {compiled}"
        return str(compiled)

    def claim(self, lane: Lane, event: Event, status: str) -> tuple[Any, ...]:
        received_at = self._timestamp(event.received_at)
        row = lane.execute(
            self.claim_sql,
            {
                "source": event.source,
                "event_id": event.id,
                "event_type": event.type,
                "status": status,
                "received_at": received_at,
                "payload": dumps(event.payload),
            },
        ).fetchone()
        row_id, duplicates, stored_status, result = row
        return row_id, duplicates, stored_status, self._result(result)

    def result_row(self, row_id: int, status: str, result: Any) -> dict[str, Any]:
        """The parameters that store one event's result (``value``: the result itself)."""
        return {
            "row_id": row_id,
            "status": status,
            "result": dumps(result, strict=True),
            "processed_at": self._timestamp(datetime.now(UTC)),
            "value": result,
        }

    def store_one(self, lane: Lane, stored: dict[str, Any]) -> None:
        lane.execute(self.finish_sql, stored)

    def store(self, stored: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        """One statement that stores every result in ``stored`` (PostgreSQL), and its parameters."""
        if len(stored) == 1:
            return self.finish_sql, stored[0]
        params: dict[str, Any] = {}
        for i, row in enumerate(stored):
            params.update(
                {
                    f"id_{i}": row["row_id"],
                    f"status_{i}": row["status"],
                    f"result_{i}": row["result"],
                    f"processed_at_{i}": row["processed_at"],
                }
            )
        return self.store_many_sql(len(stored)), params

    def store_many_sql(self, count: int) -> str:
        """``UPDATE ... FROM (VALUES ...)`` for ``count`` rows, compiled once per size.

        Compiling a fresh 100-row ``VALUES`` for every batch cost about a third
        of the time this statement saves. At most ``max_batch`` sizes are kept.
        """
        if count in self._store_many:
            return self._store_many[count]
        table = processed_events
        rows = values(
            column("id", BigInteger),
            column("status", String),
            column("result", String),  # JSON text
            column("processed_at", DateTime(timezone=True)),
            name="v",
        ).data([tuple(bindparam(f"{name}_{i}") for name in STORE_COLUMNS) for i in range(count)])
        statement = (
            update(table)
            .where(table.c.id == rows.c.id)
            .values(
                status=rows.c.status,
                result=cast(rows.c.result, JSONB),
                processed_at=rows.c.processed_at,
            )
        )
        names = {f"{name}_{i}" for name in STORE_COLUMNS for i in range(count)}
        sql = self._store_many[count] = self._compile(statement, names)
        return sql


#: The columns of the VALUES list that stores a batch's results.
STORE_COLUMNS = ("id", "status", "result", "processed_at")
#: Every parameter name the claim's statements take (see _Statements._compile).
_PARAMETERS = {
    "source",
    "event_id",
    "event_type",
    "status",
    "received_at",
    "payload",
    "row_id",
    "result",
    "processed_at",
}


def _processor(type_: Any, dialect: Any, *, bind: bool) -> Callable[[Any], Any]:
    """The dialect's bind or result processor for ``type_``, or the identity."""
    impl = type_.dialect_impl(dialect)
    found = impl.bind_processor(dialect) if bind else impl.result_processor(dialect, None)
    return found or _identity


def _identity(value: Any) -> Any:
    return value


def _pool_size(engine: Any) -> int:
    size = getattr(engine.pool, "size", None)
    return size() if callable(size) else 4


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
Timer = Callable[[Event, str, float], None]
