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

A handler's ``Reject`` rolls back the event's effects like a failure, then
records the claim as ``rejected`` (with a permanent ``delivery_failures`` row)
so that the provider stops retrying and redeliveries are duplicates.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, String, bindparam, cast, column, insert, update, values
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .db import Database, dumps, is_disconnect
from .errors import ServiceUnavailable
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
    """What the savepoint-free batch pass keeps back until the whole batch has succeeded.

    ``stored``: each processed or ignored event's result row, written in one
    statement at the end (:meth:`Claimer._store_all`). ``timings`` and
    ``observed``: timer and observer calls, made only if the pass commits, so
    a pass that falls back to savepoints is not reported twice.
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
                status=bindparam("b_status"),
                result=bindparam("result", type_=table.c.result.type),
                processed_at=bindparam("processed_at"),
            )
        )
        self._postgresql = dialect == "postgresql"
        self._store_all_sqls: dict[int, str] = {}  # see _store_all_sql

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
        if len(events) > 1:
            try:
                return self._apply_batch_without_savepoints(events)
            except _RetryWithSavepoints:
                pass  # rolled back whole: nothing it did remains or was reported
        return self._apply_with_savepoints(events, raw_body)

    def _apply_batch_without_savepoints(self, events: Sequence[Event]) -> list[Outcome]:
        """Try a batch in one transaction without savepoints; raise ``_RetryWithSavepoints``.

        Per event that saves ``SAVEPOINT``, ``RELEASE`` and the result ``UPDATE``:
        two of every three round trips besides the handler's own. Outcomes,
        timers and observers are the same as the savepoint pass would give when
        no handler fails or rejects; anything else is left to that pass.
        """
        deferred = _Deferred()
        outcomes: list[Outcome] = []
        session = self.sessions()
        try:
            with session.begin():
                for event in events:
                    started = time.perf_counter()
                    outcome = self._claim_one(session, event, deferred)
                    outcomes.append(outcome)
                    deferred.observed.append((event, outcome, time.perf_counter() - started))
                self._store_all(session, list(deferred.stored.values()))
                self._skip_flush_wait_if_only_duplicates(session, outcomes)
        except _HandlerError as exc:
            if is_disconnect(exc.__cause__):
                # Handlers already ran: answer 503 rather than run them again here.
                raise _unavailable() from exc.__cause__
            raise _RetryWithSavepoints from exc
        except _Rejected as exc:
            raise _RetryWithSavepoints from exc
        except DBAPIError as exc:
            # A statement PostgreSQL refused: typically the results' UPDATE (JSONB has no
            # Infinity), or a handler that swallowed an error and left the transaction
            # aborted. The savepoint pass finds the event at fault and fails only it.
            if is_disconnect(exc):
                raise
            raise _RetryWithSavepoints from exc
        finally:
            session.close()
        for timing in deferred.timings:
            self._time(*timing)
        for observed in deferred.observed:
            self._observe(*observed)
        return outcomes

    def _apply_with_savepoints(self, events: Sequence[Event], raw_body: bytes) -> list[Outcome]:
        """Claim a single event, or a batch with a savepoint per event."""
        nested = len(events) > 1
        started = time.perf_counter()
        outcomes: list[Outcome] = []
        session = self.sessions()
        try:
            with session.begin():
                for event in events:
                    started = time.perf_counter()
                    try:
                        if nested:
                            with session.begin_nested():
                                outcome = self._claim_one(session, event)
                        else:
                            outcome = self._claim_one(session, event)
                    except _HandlerError as exc:
                        if not nested:
                            raise
                        outcome = self._failed(event, exc)
                        self._record_failure(session, event, exc, raw_body)
                    except _Rejected as exc:
                        if not nested:
                            raise
                        # The savepoint took the claim and the effects; claim it as rejected.
                        outcome = self._reject(session, event, exc, raw_body)
                    outcomes.append(outcome)
                    self._observe(event, outcome, time.perf_counter() - started)
                self._skip_flush_wait_if_only_duplicates(session, outcomes)
        except _HandlerError as exc:
            session.close()
            if is_disconnect(exc.__cause__):
                # Handlers already ran: answer 503 rather than run them again here.
                raise _unavailable() from exc.__cause__
            outcomes = [self._failed(events[0], exc)]
            self._observe(events[0], outcomes[0], time.perf_counter() - started)
            self._record_failure_apart(events[0], exc, raw_body)
        except _Rejected as exc:
            session.close()
            outcomes = [self._reject_apart(events[0], exc, raw_body)]
            self._observe(events[0], outcomes[0], time.perf_counter() - started)
        finally:
            session.close()
        return outcomes

    def _skip_flush_wait_if_only_duplicates(
        self, session: Session, outcomes: list[Outcome]
    ) -> None:
        """Let a transaction that only counted duplicates commit without waiting for the disk.

        Such a transaction changes nothing but ``duplicate_count`` and ``last_seen_at``.
        With ``synchronous_commit`` off for it, PostgreSQL answers the commit before
        the WAL reaches the disk: a crash in the next fraction of a second can lose
        those counts, never an event, a result or a failure (docs/guarantees.md),
        and the duplicate path no longer waits for a disk flush.
        """
        if self._postgresql and outcomes and all(o.status == "duplicate" for o in outcomes):
            session.connection().exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

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

    def _claim_one(
        self, session: ClaimSession, event: Event, deferred: _Deferred | None = None
    ) -> Outcome:
        """Claim ``event`` and run its handlers; ``deferred``: the savepoint-free batch pass."""
        claim_started = time.perf_counter()
        registrations = self.registry.for_event(event.source, event.type)
        try:
            row = session.execute(
                self._claim,
                {
                    "source": event.source,
                    "event_id": event.id,
                    "event_type": event.type,
                    "status": "processed" if registrations else "ignored",
                    "received_at": event.received_at,
                    "payload": event.payload,
                },
            ).one()
        except DBAPIError as exc:
            if _is_timeout(exc) and not is_disconnect(exc):
                raise ServiceUnavailable(
                    f"Event {event.id!r} is being processed by another delivery right now; "
                    "retry shortly.",
                    code="event_in_progress",
                ) from exc
            raise
        self._time(event, "claim", time.perf_counter() - claim_started, deferred)
        if row.duplicate_count:
            if deferred is not None and event.id in deferred.stored:
                # A repeat inside this batch: its original's result is not stored yet.
                return Outcome(event.id, "duplicate", deferred.stored[event.id]["result"])
            return Outcome(event.id, "duplicate", row.result)
        if not registrations:
            return Outcome(event.id, "ignored", None)

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
            if deferred is None:
                self._store(session, event, status, result)
            else:
                # What _store's autoflush would write, written now so a failure is this event's.
                session.flush()
                stored = self._finish_params(event, status, result)
                # Serialised now, so a result JSON cannot hold fails its own event.
                stored["json"] = dumps(result)
                deferred.stored[event.id] = stored
        except _Rejected:
            raise
        except Exception as exc:  # anything a plugin raises fails this event, retryably
            raise _HandlerError(name) from exc
        return Outcome(event.id, status, result)

    def _store(self, session: Session, event: Event, status: str, result: Any) -> None:
        session.execute(self._finish, self._finish_params(event, status, result))

    @staticmethod
    def _finish_params(event: Event, status: str, result: Any) -> dict[str, Any]:
        return {
            "b_source": event.source,
            "b_id": event.id,
            "b_status": status,
            "result": result,
            "processed_at": datetime.now(UTC),
        }

    def _store_all(self, session: Session, stored: list[dict[str, Any]]) -> None:
        """Store the results of a savepoint-free batch pass in one statement.

        On PostgreSQL one ``UPDATE ... FROM (VALUES ...)`` for the whole batch: a
        round trip per event saved. SQLite, in process, has no round trips to save.
        """
        if not stored:
            return
        if not self._postgresql:
            session.execute(self._finish, [_without(p, "json") for p in stored])
            return
        params: dict[str, Any] = {}
        for i, row in enumerate(stored):
            params.update(
                {
                    f"source_{i}": row["b_source"],
                    f"id_{i}": row["b_id"],
                    f"status_{i}": row["b_status"],
                    f"result_{i}": row["json"],
                    f"processed_at_{i}": row["processed_at"],
                }
            )
        session.connection().exec_driver_sql(self._store_all_sql(len(stored)), params)

    def _store_all_sql(self, count: int) -> str:
        """The SQL of ``UPDATE ... FROM (VALUES ...)`` for ``count`` rows, compiled once.

        Built from Core like every other statement here, but compiled once per batch
        size: compiling a fresh 100-row ``VALUES`` for every batch cost about a
        third of the time this statement saves. At most ``max_batch`` sizes are kept.
        """
        if count in self._store_all_sqls:
            return self._store_all_sqls[count]
        table = processed_events
        rows = values(
            column("source", String),
            column("event_id", String),
            column("status", String),
            column("result", String),  # JSON text, serialised by _claim_one
            column("processed_at", DateTime(timezone=True)),
            name="v",
        ).data(
            [
                tuple(
                    bindparam(f"{name}_{i}")
                    for name in ("source", "id", "status", "result", "processed_at")
                )
                for i in range(count)
            ]
        )
        statement = (
            update(table)
            .where(table.c.source == rows.c.source, table.c.event_id == rows.c.event_id)
            .values(
                status=rows.c.status,
                result=cast(rows.c.result, JSONB),
                processed_at=rows.c.processed_at,
            )
        )
        sql = self._store_all_sqls[count] = str(
            statement.compile(dialect=self.database.engine.dialect)
        )
        return sql

    def _reject(self, session: Session, event: Event, exc: _Rejected, raw_body: bytes) -> Outcome:
        """Claim ``event`` as rejected (its effects are already rolled back)."""
        row = session.execute(
            self._claim,
            {
                "source": event.source,
                "event_id": event.id,
                "event_type": event.type,
                "status": "rejected",
                "received_at": event.received_at,
                "payload": event.payload,
            },
        ).one()
        if row.duplicate_count:  # another delivery claimed it while ours rolled back
            return Outcome(event.id, "duplicate", row.result)
        result = exc.reject.result()
        self._store(session, event, "rejected", result)
        self._record_failure(session, event, exc, raw_body)
        return Outcome(event.id, "rejected", result)

    def _reject_apart(self, event: Event, exc: _Rejected, raw_body: bytes) -> Outcome:
        """Claim a rejected single event in a new transaction (its own one was rolled back)."""
        session = self.sessions()
        try:
            with session.begin():
                return self._reject(session, event, exc, raw_body)
        except SQLAlchemyError as db_exc:
            if is_disconnect(db_exc):
                raise _unavailable() from db_exc
            raise
        finally:
            session.close()

    @staticmethod
    def _failed(event: Event, exc: _HandlerError) -> Outcome:
        cause = exc.__cause__
        return Outcome(
            event.id, "failed", error=f"{exc.handler_name} raised {type(cause).__name__}"
        )

    def _record_failure(
        self, session: Session, event: Event, exc: _HandlerError | _Rejected, raw_body: bytes
    ) -> None:
        if isinstance(exc, _Rejected):
            cause: BaseException = exc.reject
            error = f"{exc.handler_name} rejected the event: {exc.reason}"
        else:
            cause = exc.__cause__ or exc
            error = f"{exc.handler_name} raised {type(cause).__name__}: {cause}"
        session.execute(
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


def _without(params: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != key}


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
