"""The claim: record an event's ID and apply its handlers in one transaction.

For each event of a delivery, in one transaction on a lane (:mod:`idemhook._store.lanes`):

1. **claim**: ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``
   (:mod:`idemhook._store.statements`).
   A returned ``duplicate_count`` above 0 means the event was already applied: the
   duplicate is counted and nothing runs. A concurrent duplicate waits on the
   unique index until the first transaction ends (bounded by the lock timeout:
   ``503 event_in_progress``).
2. **run handlers** (:func:`idemhook._engine.dispatch.run_handlers`, the one handler path).
3. **store** the result: sent with the COMMIT, one statement for the whole delivery.
4. **commit**.

Each event of a batch runs inside a savepoint (``SAVEPOINT``/``RELEASE`` travel in
the round trip of its claim or its handlers' first statement on PostgreSQL), so a
handler's failure or ``Reject`` rolls back that event alone: a failed event is
answered 500 and recorded in ``delivery_failures``; a rejected one is claimed as
``rejected``. The transaction is tried again only when its connection was lost before
any handler started (a kept connection that did not survive a database restart). A
connection lost later is answered from a fresh connection's look at the claims:
committed, they are duplicates; not, ``503``.

On PostgreSQL (no ``freshness``) the events of a batch are claimed by one statement
(:meth:`DeliveryClaim._together`) instead of one per event; each event then has its
savepoint sent with its handlers' first statement, so a batch costs one round trip more
than its handlers' statements, and a failed event is still undone alone. A single event
keeps the plain one-row claim (the JSON statement costs PostgreSQL more CPU than it
saves the worker for one row) and needs no savepoint on either path, freshness
included: its transaction is rolled back whole, and a rejected event claimed anew as
``rejected``.

The whole claim runs on a claim thread watched by the request
(:mod:`idemhook._engine.watchdog`): a handler that overruns ``IDEMHOOK_HANDLER_TIMEOUT_MS``
is answered ``503 handler_timeout`` and its transaction never commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from idemhook._config.freshness import Versioned, in_version_order
from idemhook._contract import (
    Event,
    StaleEvent,
)
from idemhook._engine import failures
from idemhook._engine.attempt import overrun, unwatched, watched
from idemhook._engine.dispatch import (
    HandlerRun,
    run_handlers,
    stale_handlers,
)
from idemhook._engine.registry import (
    Registration,
    Registry,
)
from idemhook._engine.watchdog import Job, Watchdog
from idemhook._store import claims
from idemhook._store.database import (
    Database,
)
from idemhook._store.engine import (
    is_disconnect,
)
from idemhook._store.lanes import Lane
from idemhook._store.object_versions import Stale
from idemhook._store.session import (
    ClaimSession,
)
from idemhook._store.statements import ClaimRow, ClaimStatements
from idemhook._values.errors import ServiceUnavailable
from idemhook._values.jsontext import (
    body_text,
    dumps,
)
from idemhook._values.outcome import Outcome, Status

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
    #: ``delivery_failures`` rows, written after the transaction ends (on its lane).
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: Observer and timer calls, made once the transaction's fate is known.
    observed: list[tuple[Event, Outcome, float]] = field(default_factory=list)
    timings: list[tuple[Event, str, float]] = field(default_factory=list)
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
        self.statements = statements = ClaimStatements(engine.dialect)
        database.lanes.prepared.register(
            statements.claim_sql,
            statements.tenant_claim_sql,
            statements.recovered_claim_sql,
            statements.finish_sql,
        )
        #: At most as many claim threads as the pool has connections (size + overflow),
        #: so a claim never waits for a connection behind handlers that overran.
        self.watchdog = Watchdog(handler_timeout_ms, threads=claim_threads)
        self._postgresql = engine.dialect.name == "postgresql"

    # -- the straight line ---------------------------------------------------------------------

    def apply(
        self,
        events: Sequence[Event],
        raw_body: bytes,
        versions: Sequence[Versioned] | None = None,
        *,
        lock_objects: bool = False,
        recovered: bool = False,
        body_is_payload: bool = False,
    ) -> list[Outcome]:
        """Claim and handle ``events``; answer when done, or 503 when a handler overruns.

        ``versions``: each event's object and version, for a source with ``freshness``
        (:mod:`app.freshness`). The events are then applied in object and version order
        (:func:`~app.freshness.in_version_order`); the outcomes keep the delivery's order.
        ``lock_objects``: take each object's advisory lock before its event's claim (every
        delivery of a batch source, :mod:`idemhook._store.object_versions` says why).
        ``recovered``: the events were found by a reconcile run, not delivered; their
        claims say so (``received_via``), and nothing else differs (docs/reconcile.md).
        ``body_is_payload``: ``raw_body`` is the one event's payload as JSON text (a source
        without ``batch`` whose scheme parses JSON): the claim stores that text, not the
        payload serialised again (:func:`~idemhook._values.jsontext.body_text`).
        """
        if versions is None or len(events) < 2:
            attempt = DeliveryClaim(self, events, raw_body, versions, lock_objects)
            if body_is_payload and len(events) == 1:
                attempt.payload_text = body_text(raw_body)
            if recovered:
                attempt.claim_sql = self.statements.recovered_claim_sql
            return self._run(attempt)
        order = in_version_order(versions)
        attempt = DeliveryClaim(
            self,
            [events[i] for i in order],
            raw_body,
            [versions[i] for i in order],
            lock_objects,
        )
        if recovered:
            attempt.claim_sql = self.statements.recovered_claim_sql
        applied = self._run(attempt)
        if len(applied) != len(order):
            return applied  # abandoned: nothing to put back in order
        outcomes: list[Outcome] = list(applied)
        for position, index in enumerate(order):
            outcomes[index] = applied[position]
        return outcomes

    def _run(self, attempt: DeliveryClaim) -> list[Outcome]:
        """On a claim thread, watched (``503 handler_timeout``), unless every handler that
        could run says it does only database work (``@handler(..., database_only=True)``)."""
        if self.registry.watch_needed(attempt.events):
            return watched(self.watchdog, attempt, on_overrun=attempt.overran)
        return unwatched(attempt)

    def _report(self, tx: _Transaction) -> None:
        for timing in tx.timings:
            for timer in self.timers:
                timer(*timing)
        for observed in tx.observed:
            for observer in self.observers:
                observer(*observed)


class DeliveryClaim:
    """One delivery's claim: an :class:`~idemhook._engine.attempt.Attempt` (see its faults)."""

    def __init__(
        self,
        claimer: Claimer,
        events: Sequence[Event],
        raw_body: bytes,
        versions: Sequence[Versioned] | None = None,
        lock_objects: bool = False,
    ) -> None:
        self.claimer = claimer
        self.events = events
        self.raw_body = raw_body
        #: Each event's object and version (a source with ``freshness``), else None.
        self.versions = versions
        self.lock_objects = lock_objects
        self.tx = _Transaction()
        #: The event whose claim statement runs now (named when it waits too long).
        self.claiming: Event | None = None
        #: The claim statement: a live delivery's, a tenant's (its events all have the
        #: delivery's tenant), or a recovered event's (Claimer.apply).
        self.tenant = events[0].tenant if events else None
        self.claim_sql = (
            claimer.statements.claim_sql
            if self.tenant is None
            else claimer.statements.tenant_claim_sql
        )
        self.claiming_object: str | None = None
        #: The one event's payload as stored, when the body is its JSON text (Claimer.apply).
        self.payload_text: str | None = None
        #: Whether the events are claimed by one statement (see the module's docstring). A
        #: single event keeps the plain one-row claim: the JSON statement costs PostgreSQL
        #: about 0.15 ms of CPU more per event than it saves the worker (docs/performance.md).
        self.one_statement = (
            versions is None and len(events) > 1 and claimer.statements.claim_many_sql is not None
        )

    def once(self, job: Job) -> list[Outcome]:
        statements = self.claimer.statements
        together = self.one_statement and (
            self.claim_sql is statements.claim_sql or self.claim_sql is statements.tenant_claim_sql
        )
        headers = dumps(failures.safe_headers(self.events[0].headers))
        self.tx = _Transaction(headers=headers)
        with self.claimer.database.lanes.lane() as lane:
            lane.begin()
            try:
                applied = self._together(lane, job) if together else self._apart(lane, job)
                if not applied:  # abandoned: answered handler_timeout already
                    lane.rollback()
                    return []
                sql, params = self._closing_statement()
                if not job.may_commit():  # answered handler_timeout already: keep nothing
                    lane.rollback()
                    return []
                lane.commit(sql, params)
            finally:
                if lane.in_transaction:
                    lane.rollback()
                lane.session.close()
            # On the attempt's own lane: never waits for the pool (docs/guarantees.md).
            failures.write(lane, self.tx.failures)
        self.claimer._report(self.tx)
        return self.tx.outcomes

    def _together(self, lane: Lane, job: Job) -> bool:
        """Claim every event of the delivery in one statement, then run each event's handlers.

        Each event of a batch still runs in a savepoint of its own, sent with its handlers'
        first statement (:meth:`~idemhook._store.lanes.Lane.savepoint`), so a failed event
        is undone alone and no handler runs twice; the claim of a failed event is deleted
        with it, a rejected one's is stored as ``rejected``. Returns False when the job
        was abandoned.
        """
        claimer, events, tx = self.claimer, self.events, self.tx
        statements = claimer.statements
        registry = claimer.registry
        distinct: dict[str, Event] = {}
        repeats: dict[str, int] = {}
        for event in events:
            if distinct.setdefault(event.id, event) is event:
                repeats[event.id] = 0
            else:
                repeats[event.id] += 1
        claimed = list(distinct.values())
        handled = [registry.for_event(event.source, event.type) for event in claimed]
        statuses = [Status.PROCESSED if found else Status.IGNORED for found in handled]
        registrations = dict(zip(distinct, handled, strict=True))
        started = time.perf_counter()
        self.claiming = events[0]
        params = statements.claim_many_params(claimed, statuses, list(repeats.values()), tx.headers)
        sql = statements.claim_many_for(events[0].source)
        rows = statements.claim_rows(lane.execute(sql, params).fetchall(), repeats)
        self.claiming = None
        share = (time.perf_counter() - started) / len(claimed)
        first: dict[str, Outcome] = {}
        for event in events:
            if job.abandoned:
                return False
            tx.timings.append((event, "claim", share))
            earlier = first.get(event.id)
            if earlier is None:
                outcome = first[event.id] = self._claimed(
                    lane, event, job, rows[event.id], registrations[event.id]
                )
            else:  # a repeat inside this delivery: answered as its first was
                outcome = self._repeated(event, earlier)
            tx.outcomes.append(outcome)
        return True

    def _repeated(self, event: Event, first: Outcome) -> Outcome:
        """A repeat of an event inside this delivery: answered as its first occurrence was,
        without running anything. A failed one is recorded again (one failure row per
        failed occurrence, as a delivery that ran each would leave)."""
        outcome = _repeat(first)
        if outcome.status is Status.FAILED:
            rows = self.tx.failures
            row = next(r for r in reversed(rows) if r["event_id"] == event.id)
            rows.append(dict(row))
        return self._done(event, outcome, time.perf_counter())

    def _claimed(
        self,
        lane: Lane,
        event: Event,
        job: Job,
        row: ClaimRow,
        registrations: Sequence[Registration],
    ) -> Outcome:
        """Apply ``event``, claimed already (``row``), in its savepoint."""
        started = time.perf_counter()
        if row.duplicates:
            return self._done(event, Outcome(event.id, Status.DUPLICATE, row.result), started)
        if not registrations:
            return self._done(event, Outcome(event.id, Status.IGNORED), started)
        alone = len(self.events) == 1
        if not alone:
            lane.savepoint()  # leaves with the handlers' first statement
        run = self._run(lane, event, job, registrations)
        if run.status in (Status.PROCESSED, Status.IGNORED):
            self._store(lane, row.id, run.status, run.stored or "null", event, run.result)
            return self._done(event, Outcome(event.id, run.status, run.result), started)
        if alone:  # no savepoint: the transaction is the event's (see _undo)
            return self._undo(lane, event, run, started)
        tx, statements = self.tx, self.claimer.statements
        lane.session.close()
        lane.rollback_to_savepoint()
        if run.status is Status.REJECTED:
            stored = statements.result_row(row.id, Status.REJECTED, dumps(run.result, strict=True))
            lane.execute(statements.finish_sql, stored)
            outcome = Outcome(event.id, Status.REJECTED, run.result, handler=run.handler)
        else:
            lane.execute(statements.forget_sql, {"row_id": row.id})
            outcome = _failed_outcome(event, run)
        tx.failures.append(failures.failure_of(event, run, self.raw_body))
        return self._done(event, outcome, started)

    def _apart(self, lane: Lane, job: Job) -> bool:
        """Claim and apply each event in turn (a batch's each in its own savepoint, so a
        failed one is undone alone). Returns False when the job was abandoned."""
        tx, versions = self.tx, self.versions
        failed: dict[str, Outcome] = {}
        for i, event in enumerate(self.events):
            if job.abandoned:
                return False
            if event.id in failed:  # a repeat of a failed event: never run twice
                tx.outcomes.append(self._repeated(event, failed[event.id]))
                continue
            versioned = versions[i] if versions is not None else None
            outcome = self._event(lane, event, job, versioned)
            if outcome.status is Status.FAILED:
                failed[event.id] = outcome
            tx.outcomes.append(outcome)
        return True

    # -- one event -----------------------------------------------------------------------------

    def _event(self, lane: Lane, event: Event, job: Job, versioned: Versioned | None) -> Outcome:
        """Claim ``event`` and run its handlers (inside its own savepoint in a batch)."""
        claimer, tx = self.claimer, self.tx
        started = time.perf_counter()
        registrations = claimer.registry.for_event(event.source, event.type)
        if len(self.events) > 1:
            lane.savepoint()
        status = Status.PROCESSED if registrations else Status.IGNORED
        if versioned is None:
            row, stale = self._claim(lane, event, status), None
        else:
            row, stale = self._claim_fresh(lane, event, status, versioned)
        tx.timings.append((event, "claim", time.perf_counter() - started))
        if row.duplicates:
            pending = tx.stored.get(event.id)  # a repeat inside this delivery
            result = pending["value"] if pending is not None else row.result
            return self._done(event, Outcome(event.id, Status.DUPLICATE, result), started)
        if stale is not None:
            return self._stale(lane, event, job, registrations, row, stale, started)
        if not registrations:
            return self._done(event, Outcome(event.id, Status.IGNORED), started)

        run = self._run(lane, event, job, registrations)
        if run.status in (Status.PROCESSED, Status.IGNORED):
            self._store(lane, row.id, run.status, run.stored or "null", event, run.result)
            return self._done(event, Outcome(event.id, run.status, run.result), started)
        return self._undo(lane, event, run, started)

    def _run(
        self, lane: Lane, event: Event, job: Job, registrations: Sequence[Registration]
    ) -> HandlerRun:
        """Run ``event``'s handlers (the one handler path) on the lane's session."""
        job.handlers_started(event)
        started = time.perf_counter()
        run = run_handlers(
            registrations, event, lane.session, senders=self.claimer.registry.senders
        )
        job.handlers_ended()
        self.tx.timings.append((event, "handlers", time.perf_counter() - started))
        if run.status is Status.FAILED and is_disconnect(run.error):
            raise run.error  # type: ignore[misc]  # the lost connection: the bracket decides
        return run

    def _stale(
        self,
        lane: Lane,
        event: Event,
        job: Job,
        registrations: Sequence[Registration],
        row: Any,
        stale: Stale,
        started: float,
    ) -> Outcome:
        """``event`` is older than its object's applied version: claim it ``stale``.

        Only the handlers registered with ``stale=True`` run (seeing ``event.stale``);
        the result names the newer event, and what those handlers returned.
        """
        result: dict[str, Any] = {"newer": stale.newer}
        handlers = stale_handlers(registrations)
        if handlers:
            job.handlers_started(event)
            handlers_started = time.perf_counter()
            senders = self.claimer.registry.senders
            run = run_handlers(handlers, StaleEvent.of(event), lane.session, senders=senders)
            job.handlers_ended()
            self.tx.timings.append((event, "handlers", time.perf_counter() - handlers_started))
            if run.status is Status.FAILED and is_disconnect(run.error):
                raise run.error  # type: ignore[misc]  # the lost connection: the bracket decides
            if run.status not in (Status.PROCESSED, Status.IGNORED):
                return self._undo(lane, event, run, started)
            result["handlers"] = run.result
        self._store(lane, row.id, Status.STALE, dumps(result, strict=True), event, result)
        return self._done(event, Outcome(event.id, Status.STALE, result), started)

    def _store(
        self, lane: Lane, row_id: int, status: Status, stored: str, event: Event, value: Any
    ) -> None:
        """Store an applied event's result: with the COMMIT on PostgreSQL, now on SQLite."""
        claimer = self.claimer
        row = claimer.statements.result_row(row_id, status, stored)
        if claimer._postgresql:
            self.tx.stored[event.id] = {**row, "value": value}
        else:
            lane.execute(claimer.statements.finish_sql, row)

    def _undo(self, lane: Lane, event: Event, run: HandlerRun, started: float) -> Outcome:
        """Failed or rejected: undo this event's claim and effects, keep the others'.

        A single event has no savepoint: its transaction is rolled back whole and begun
        again, so that a rejected event is claimed anew as ``rejected``.
        """
        tx = self.tx
        lane.session.close()
        if len(self.events) == 1:
            lane.rollback()
            lane.begin()
        else:
            lane.rollback_to_savepoint()
        if run.status is Status.REJECTED:
            outcome = self._claim_rejected(lane, event, run)
            if outcome.status is Status.REJECTED:
                tx.failures.append(failures.failure_of(event, run, self.raw_body))
        else:
            outcome = _failed_outcome(event, run)
            tx.failures.append(failures.failure_of(event, run, self.raw_body))
        return self._done(event, outcome, started)

    def _claim(self, lane: Lane, event: Event, status: Status) -> Any:
        statements = self.claimer.statements
        self.claiming = event
        row = lane.execute(
            self.claim_sql,
            statements.claim_params(event, status, self.tx.headers, self.payload_text),
        ).fetchone()
        self.claiming = None
        return statements.claim_row(row)

    def _claim_fresh(
        self, lane: Lane, event: Event, status: Status, versioned: Versioned
    ) -> tuple[Any, Stale | None]:
        """Claim ``event`` and check its version (one statement on PostgreSQL).

        Returns the claim's row and, for a new event that is not newer than its object's
        applied version, what made it stale (the version has not moved).
        """
        statements = self.claimer.statements
        fresh = statements.fresh if self.tenant is None else statements.tenant_fresh
        self.claiming, self.claiming_object = event, versioned.object_key
        params = statements.claim_params(event, status, self.tx.headers, self.payload_text)
        if self.claimer._postgresql:
            # An int or a Decimal: psycopg2 writes either as a number, no quoting.
            params["object_key"], params["version"] = versioned
            sql = fresh.claim_sql(event.source, lock=self.lock_objects)
            self.claimer.database.lanes.prepared.use(sql)
            row_id, duplicates, status_, result, newer = lane.execute(sql, params).fetchone()
            row = statements.claim_row((row_id, duplicates, status_, result))
            # newer: None when the version moved (or a duplicate), else the newer event.
            stale = None if newer is None or duplicates else Stale(newer or None)
        else:
            row = statements.claim_row(lane.execute(self.claim_sql, params).fetchone())
            stale = None
            if not row.duplicates:
                stale = fresh.check(lane, event.source, event.id, versioned)
        self.claiming = self.claiming_object = None
        return row, stale

    def _claim_rejected(self, lane: Lane, event: Event, run: HandlerRun) -> Outcome:
        """Claim ``event`` as rejected (its effects are already rolled back)."""
        row = self._claim(lane, event, Status.REJECTED)
        if row.duplicates:  # another delivery claimed it while ours rolled back
            return Outcome(event.id, Status.DUPLICATE, row.result)
        statements = self.claimer.statements
        stored = statements.result_row(row.id, Status.REJECTED, dumps(run.result, strict=True))
        lane.execute(statements.finish_sql, stored)
        return Outcome(event.id, Status.REJECTED, run.result, handler=run.handler)

    def _done(self, event: Event, outcome: Outcome, started: float) -> Outcome:
        self.tx.observed.append((event, outcome, time.perf_counter() - started))
        return outcome

    def _closing_statement(self) -> tuple[str | None, dict[str, Any] | None]:
        """The statement sent with the COMMIT: the results to store, or none.

        A transaction that only counted duplicates changes nothing but
        ``duplicate_count`` and ``last_seen_at``. With ``synchronous_commit`` off
        for it, PostgreSQL answers the commit before the WAL reaches the disk: a
        crash in the next fraction of a second can lose those counts, never an
        event, a result or a failure (docs/guarantees.md), and the duplicate path
        no longer waits for a disk flush.
        """
        tx, claimer = self.tx, self.claimer
        if tx.stored:
            return claimer.statements.store(list(tx.stored.values()))
        if claimer._postgresql and all(o.status is Status.DUPLICATE for o in tx.outcomes):
            return claimer.statements.duplicates_only_sql, None
        return None, None

    # -- what the bracket decided ----------------------------------------------------------------

    def refused(self, error: DBAPIError) -> list[Outcome]:
        """PostgreSQL refused the COMMIT (a deferred constraint, a serialization failure).

        Nothing of the transaction remains: every event it claimed failed, and
        each gets a ``delivery_failures`` row naming the commit's error.
        """
        tx, failed = self.tx, _Transaction()
        for event, outcome in zip(self.events, tx.outcomes, strict=True):
            if outcome.status is Status.DUPLICATE:
                failed.outcomes.append(outcome)
                continue
            run = HandlerRun(Status.FAILED, handler="COMMIT", error=error)
            failed.outcomes.append(_failed_outcome(event, run))
            failed.failures.append(failures.failure_of(event, run, self.raw_body))
        failed.observed = [(e, o, 0.0) for e, o in zip(self.events, failed.outcomes, strict=True)]
        failed.timings = tx.timings
        with self.claimer.database.lanes.lane() as lane:
            failures.write(lane, failed.failures)
        self.claimer._report(failed)
        return failed.outcomes

    def resolve(self, lost: DBAPIError) -> list[Outcome]:
        """The connection died at or after the handlers: never run them again here.

        Look at the claims on a fresh connection: committed (our COMMIT landed
        before the connection died, or another delivery applied them since), they
        are answered as the duplicates they now are; otherwise 503. Nothing is
        changed: a claim of ours that did not commit left nothing behind.
        """
        keys = [(e.source, e.id) for e in self.events]
        try:
            found = claims.results(self.claimer.database.engine, keys)
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc
        if all(e.id in found for e in self.events):
            return [Outcome(e.id, Status.DUPLICATE, found[e.id]) for e in self.events]
        raise self.unavailable(lost) from lost

    def in_progress(self, error: DBAPIError) -> Exception:
        which = f"Event {self.claiming.id!r}" if self.claiming is not None else "This event"
        if self.claiming_object is not None:
            return ServiceUnavailable(
                f"{which} waits for another delivery of it, or of another event of object "
                f"{self.claiming_object!r}, that is being processed right now; retry shortly.",
                code="event_in_progress",
            )
        return ServiceUnavailable(
            f"{which} is being processed by another delivery right now; retry shortly.",
            code="event_in_progress",
        )

    def unavailable(self, error: DBAPIError) -> Exception:
        return ServiceUnavailable(
            "The database is unavailable; nothing was recorded. Retry shortly.",
            code="database_unavailable",
        )

    def abandoned(self) -> list[Outcome]:
        return []  # answered already (handler_timeout); nothing of it was kept

    def overran(self, job: Job) -> None:
        """Record the handler that overran (called by the request thread, once)."""
        claimer = self.claimer
        event = job.event
        run = overrun(
            claimer.watchdog,
            "IDEMHOOK_HANDLER_TIMEOUT_MS",
            "the delivery was answered 503 handler_timeout and its transaction rolled back",
        )
        failures.record(claimer.database.reserve, [failures.failure_of(event, run, self.raw_body)])
        outcome = _failed_outcome(event, run)
        for observer in claimer.observers:
            observer(event, outcome, claimer.watchdog.limit)


def _repeat(first: Outcome) -> Outcome:
    """The answer to an event's repeat inside one delivery, from its first occurrence's."""
    if first.status in (Status.FAILED, Status.DUPLICATE):
        return first
    return Outcome(first.event_id, Status.DUPLICATE, first.result)


def _failed_outcome(event: Event, run: HandlerRun) -> Outcome:
    return Outcome(
        event.id,
        Status.FAILED,
        error=run.summary,
        handler=run.handler,
        error_type=type(run.error).__name__,
    )
