"""The claim: record an event's ID and apply its handlers in one transaction.

For each event of a delivery, in one transaction on a lane (:mod:`app.lanes`):

1. **claim**: ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` (:mod:`app.statements`).
   A returned ``duplicate_count`` above 0 means the event was already applied: the
   duplicate is counted and nothing runs. A concurrent duplicate waits on the
   unique index until the first transaction ends (bounded by the lock timeout:
   ``503 event_in_progress``).
2. **run handlers** (:func:`app.dispatch.run_handlers`, the one handler path).
3. **store** the result: sent with the COMMIT, one statement for the whole delivery.
4. **commit**.

Each event runs inside a savepoint (``SAVEPOINT``/``RELEASE`` travel in the
round trip of its claim on PostgreSQL), so a handler's failure or ``Reject``
rolls back that event alone: a failed event is answered 500 and recorded in
``delivery_failures``; a rejected one is claimed as ``rejected``. No handler
ever runs twice in one delivery: the transaction is tried again only when its
connection was lost before any handler started (a kept connection that did not
survive a database restart). A connection lost later is answered from a fresh
connection's look at the claims: committed, they are duplicates; not, ``503``.

The whole claim runs on a claim thread watched by the request
(:mod:`app.watchdog`): a handler that overruns ``IDEMHOOK_HANDLER_TIMEOUT_MS``
is answered ``503 handler_timeout`` and its transaction never commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from . import failures
from .db import Database, dumps, is_disconnect, is_timeout
from .dispatch import ClaimSession, HandlerRun, run_handlers
from .errors import ServiceUnavailable
from .lanes import Lane
from .models import processed_events
from .outcome import Outcome, Status
from .plugins import Event, Registry
from .statements import ClaimStatements
from .watchdog import Job, Watchdog

__all__ = ["ClaimSession", "Claimer", "Outcome", "Status"]

log = logging.getLogger("idemhook.claim")

Observer = Callable[[Event, Outcome, float], None]
Timer = Callable[[Event, str, float], None]


@dataclass(slots=True)
class _Transaction:
    """What one claim transaction has done so far, kept until it commits."""

    outcomes: list[Outcome] = field(default_factory=list)
    #: Result rows of applied events, stored by one statement sent with the COMMIT.
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``delivery_failures`` rows, written after the transaction ends.
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: Observer and timer calls, made once the transaction's fate is known.
    observed: list[tuple[Event, Outcome, float]] = field(default_factory=list)
    timings: list[tuple[Event, str, float]] = field(default_factory=list)
    #: What PostgreSQL answered a COMMIT it refused.
    refused: DBAPIError | None = None
    #: The delivery's headers as stored with each claim (JSON; one request, one value).
    headers: str = "{}"


class Claimer:
    """Applies events exactly once against one database with one handler registry."""

    def __init__(
        self,
        database: Database,
        registry: Registry,
        observers: Sequence[Observer] = (),
        *,
        handler_timeout_ms: int = 4000,
        claim_threads: int = 8,
    ) -> None:
        self.database = database
        self.registry = registry
        #: Called after each event with (event, outcome, seconds); logging and metrics.
        self.observers: list[Observer] = list(observers)
        #: Called with (event, phase, seconds) for phase "claim" (the INSERT, including
        #: any wait on a concurrent delivery of the same event) and "handlers".
        self.timers: list[Timer] = []
        engine = database.engine
        #: Sessions outside the claim (replay).
        self.sessions = sessionmaker(engine, class_=ClaimSession, expire_on_commit=False)
        self.statements = ClaimStatements(engine.dialect)
        #: At most as many claim threads as the pool has connections (size + overflow),
        #: so a claim never waits for a connection behind handlers that overran.
        self.watchdog = Watchdog(handler_timeout_ms, threads=claim_threads)
        self._postgresql = engine.dialect.name == "postgresql"

    # -- the straight line ---------------------------------------------------------------------

    def apply(self, events: Sequence[Event], raw_body: bytes) -> list[Outcome]:
        """Claim and handle ``events``; answer when done, or 503 when a handler overruns."""
        return self.watchdog.run(
            lambda job: self._apply(events, raw_body, job),
            on_overrun=lambda job: self._overran(job, raw_body),
        )

    def _apply(self, events: Sequence[Event], raw_body: bytes, job: Job) -> list[Outcome]:
        try:
            return self._transaction(events, raw_body, job)
        except DBAPIError as exc:
            if job.abandoned:
                return []  # answered already (handler_timeout); nothing of it was kept
            if not is_disconnect(exc) or job.handlers_ran:
                if is_disconnect(exc):
                    return self._after_lost_connection(events, exc)
                raise
        # Lost before any handler started: a kept connection that did not survive a
        # database restart (every idle lane is retired with it). Safe to try once more.
        try:
            return self._transaction(events, raw_body, job)
        except DBAPIError as exc:
            if is_disconnect(exc):
                return self._after_lost_connection(events, exc)
            raise

    def _transaction(self, events: Sequence[Event], raw_body: bytes, job: Job) -> list[Outcome]:
        tx = _Transaction(headers=dumps(failures.safe_headers(events[0].headers)))
        with self.database.lanes.lane() as lane:
            lane.begin()
            try:
                for event in events:
                    if job.abandoned:
                        lane.rollback()
                        return []
                    tx.outcomes.append(self._event(lane, event, job, tx, raw_body))
                self._commit(lane, job, tx)
            finally:
                if lane.in_transaction:
                    lane.rollback()
                lane.session.close()
        if job.abandoned:
            return []  # the request has been answered; nothing of this claim was kept
        if tx.refused is not None:
            tx = self._commit_failed(events, tx, raw_body, tx.refused)
        failures.record(self.database.engine, tx.failures)
        self._report(tx)
        return tx.outcomes

    # -- one event -----------------------------------------------------------------------------

    def _event(
        self, lane: Lane, event: Event, job: Job, tx: _Transaction, raw_body: bytes
    ) -> Outcome:
        """Claim ``event`` and run its handlers inside its own savepoint."""
        started = time.perf_counter()
        registrations = self.registry.for_event(event.source, event.type)
        lane.savepoint()
        status = Status.PROCESSED if registrations else Status.IGNORED
        row = self._claim(lane, event, status, tx.headers)
        tx.timings.append((event, "claim", time.perf_counter() - started))
        if row.duplicates:
            pending = tx.stored.get(event.id)  # a repeat inside this delivery
            result = pending["value"] if pending is not None else row.result
            return self._done(tx, event, Outcome(event.id, Status.DUPLICATE, result), started)
        if not registrations:
            return self._done(tx, event, Outcome(event.id, Status.IGNORED), started)

        job.handlers_started(event)
        handlers_started = time.perf_counter()
        run = run_handlers(registrations, event, lane.session, senders=self.registry.senders)
        job.handlers_ended()
        tx.timings.append((event, "handlers", time.perf_counter() - handlers_started))
        if run.status is Status.FAILED and is_disconnect(run.error):
            raise run.error  # type: ignore[misc]  # the lost connection, handled by _apply

        if run.status in (Status.PROCESSED, Status.IGNORED):
            stored = self.statements.result_row(row.id, run.status, run.stored or "null")
            if self._postgresql:
                tx.stored[event.id] = {**stored, "value": run.result}
            else:
                lane.execute(self.statements.finish_sql, stored)
            return self._done(tx, event, Outcome(event.id, run.status, run.result), started)

        # Failed or rejected: undo this event's claim and effects, keep the others'.
        lane.session.close()
        lane.rollback_to_savepoint()
        if run.status is Status.REJECTED:
            outcome = self._claim_rejected(lane, event, run, tx.headers)
            if outcome.status is Status.REJECTED:
                tx.failures.append(_failure(event, run, raw_body))
        else:
            outcome = _failed_outcome(event, run)
            tx.failures.append(_failure(event, run, raw_body))
        return self._done(tx, event, outcome, started)

    def _claim(self, lane: Lane, event: Event, status: Status, headers: str) -> Any:
        params = self.statements.claim_params(event, status, headers)
        try:
            row = lane.execute(self.statements.claim_sql, params).fetchone()
        except DBAPIError as exc:
            if is_timeout(exc) and not is_disconnect(exc):
                raise ServiceUnavailable(
                    f"Event {event.id!r} is being processed by another delivery right now; "
                    "retry shortly.",
                    code="event_in_progress",
                ) from exc
            raise
        return self.statements.claim_row(row)

    def _claim_rejected(
        self, lane: Lane, event: Event, run: HandlerRun, headers: str
    ) -> Outcome:
        """Claim ``event`` as rejected (its effects are already rolled back)."""
        row = self._claim(lane, event, Status.REJECTED, headers)
        if row.duplicates:  # another delivery claimed it while ours rolled back
            return Outcome(event.id, Status.DUPLICATE, row.result)
        stored = self.statements.result_row(
            row.id, Status.REJECTED, dumps(run.result, strict=True)
        )
        lane.execute(self.statements.finish_sql, stored)
        return Outcome(event.id, Status.REJECTED, run.result, handler=run.handler)

    @staticmethod
    def _done(tx: _Transaction, event: Event, outcome: Outcome, started: float) -> Outcome:
        tx.observed.append((event, outcome, time.perf_counter() - started))
        return outcome

    # -- the end of the transaction ------------------------------------------------------------

    def _commit(self, lane: Lane, job: Job, tx: _Transaction) -> None:
        """Store the results and commit (``tx.refused``: what PostgreSQL refused).

        A lost connection is raised (the caller looks up what committed); an
        abandoned claim (its handler overran) is rolled back instead.
        """
        sql, params = self._closing_statement(tx)
        if not job.may_commit():
            lane.rollback()
            return
        try:
            lane.commit(sql, params)
        except DBAPIError as exc:
            if is_disconnect(exc):
                raise
            lane.rollback()
            tx.refused = exc

    def _closing_statement(self, tx: _Transaction) -> tuple[str | None, dict[str, Any] | None]:
        """The statement sent with the COMMIT: the results to store, or none.

        A transaction that only counted duplicates changes nothing but
        ``duplicate_count`` and ``last_seen_at``. With ``synchronous_commit`` off
        for it, PostgreSQL answers the commit before the WAL reaches the disk: a
        crash in the next fraction of a second can lose those counts, never an
        event, a result or a failure (docs/guarantees.md), and the duplicate path
        no longer waits for a disk flush.
        """
        if tx.stored:
            return self.statements.store(list(tx.stored.values()))
        if self._postgresql and all(o.status is Status.DUPLICATE for o in tx.outcomes):
            return "SET LOCAL synchronous_commit TO OFF", None
        return None, None

    def _commit_failed(
        self, events: Sequence[Event], tx: _Transaction, raw_body: bytes, error: DBAPIError
    ) -> _Transaction:
        """PostgreSQL refused the COMMIT (a deferred constraint, a serialization failure).

        Nothing of the transaction remains: every event it claimed failed, and
        each gets a ``delivery_failures`` row naming the commit's error.
        """
        failed = _Transaction()
        for event, outcome in zip(events, tx.outcomes, strict=True):
            if outcome.status is Status.DUPLICATE:
                failed.outcomes.append(outcome)
                continue
            run = HandlerRun(Status.FAILED, handler="COMMIT", error=error)
            failed.outcomes.append(_failed_outcome(event, run))
            failed.failures.append(_failure(event, run, raw_body))
        failed.observed = [(e, o, 0.0) for e, o in zip(events, failed.outcomes, strict=True)]
        failed.timings = tx.timings
        return failed

    def _after_lost_connection(self, events: Sequence[Event], lost: DBAPIError) -> list[Outcome]:
        """The connection died at or after the handlers: never run them again here.

        Look at the claims on a fresh connection: committed (our COMMIT landed
        before the connection died, or another delivery applied them since), they
        are answered as the duplicates they now are; otherwise 503.
        """
        keys = [(e.source, e.id) for e in events]
        table = processed_events
        try:
            with self.database.engine.connect() as conn:
                found = dict(
                    conn.execute(
                        select(table.c.event_id, table.c.result).where(
                            tuple_(table.c.source, table.c.event_id).in_(keys)
                        )
                    ).all()
                )
        except DBAPIError as exc:
            raise _unavailable() from exc
        if all(e.id in found for e in events):
            return [Outcome(e.id, Status.DUPLICATE, found[e.id]) for e in events]
        raise _unavailable() from lost

    def _overran(self, job: Job, raw_body: bytes) -> None:
        """Record the handler that overran (called by the request thread, once)."""
        event = job.event
        limit = round(self.watchdog.limit * 1000)
        error = TimeoutError(
            f"the handlers ran longer than IDEMHOOK_HANDLER_TIMEOUT_MS ({limit} ms); the "
            "delivery was answered 503 handler_timeout and its transaction rolled back"
        )
        run = HandlerRun(Status.FAILED, handler="handlers", error=error)
        outcome = _failed_outcome(event, run)
        failures.record(self.database.engine, [_failure(event, run, raw_body)])
        for observer in self.observers:
            observer(event, outcome, self.watchdog.limit)

    def _report(self, tx: _Transaction) -> None:
        for timing in tx.timings:
            for timer in self.timers:
                timer(*timing)
        for observed in tx.observed:
            for observer in self.observers:
                observer(*observed)


def _failure(event: Event, run: HandlerRun, raw_body: bytes) -> dict[str, Any]:
    if run.error is None:  # pragma: no cover (failed and rejected runs carry their error)
        raise ValueError("a failed handler run without its error")
    return failures.failure_row(
        event,
        error=run.error_text,
        cause=run.error,
        raw_body=raw_body,
        permanent=run.status is Status.REJECTED,
    )


def _failed_outcome(event: Event, run: HandlerRun) -> Outcome:
    return Outcome(
        event.id,
        Status.FAILED,
        error=run.summary,
        handler=run.handler,
        error_type=type(run.error).__name__,
    )


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The database is unavailable; nothing was recorded. Retry shortly.",
        code="database_unavailable",
    )
