"""Applying received events: the worker's second kind of work (:class:`Applier`).

An asynchronous source's delivery left each event in ``processed_events`` with
status ``received`` (:mod:`idemhook._engine.accept`). ``idemhook worker`` applies them, a
small batch at a time, each batch **one transaction** on a claim lane:

1. **take** due events from ``event_queue`` (one row per event still to apply),
   oldest first, ``SELECT ... FOR UPDATE OF q SKIP LOCKED`` joined to their
   ``processed_events`` rows: workers never wait on each other and never take the
   same event. The queue row's lock is held until the transaction ends, so a
   worker that dies mid-handler (SIGKILL, a lost machine) loses its transaction
   and its locks with its connection, and the next worker takes the event at
   once: nothing was leased. The event's own row is not locked: a duplicate
   delivery counts itself on it and is answered while the handlers run.
2. **run** each event's handlers in a savepoint through the one handler path
   (:func:`idemhook._engine.dispatch.run_handlers`): the same ``Event`` (payload, stored
   headers, ``received_at``), the same session contract, ``event.outbox``.
3. **record** in the same transaction: ``processed`` or ``ignored`` with the
   result; ``rejected`` (effects rolled back to the savepoint, a permanent
   ``delivery_failures`` row); a handler that raised has its effects rolled back,
   a ``delivery_failures`` row, and is due again after :func:`idemhook._engine.worker.backoff`,
   or ``failed`` after the source's ``max_attempts``. A finished event's queue row
   is deleted.
4. **commit**: the results, the queue, the failure rows and every handler's
   writes together, or nothing. (The synchronous claim writes its failure rows
   after its transaction, which it rolls back; here the failed attempt itself is
   committed, its count and its backoff, and its failure row must be there when
   any worker can take the event again: a handler that looks at its event's
   failures, or an operator, never sees an attempt without its row.)

**Order keys.** An event whose source sets ``order_key`` is taken only when no
earlier event (lower ``id``) with the same source and key is still queued::

    ... AND (q.order_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM event_queue p WHERE p.source = q.source
        AND p.order_key = q.order_key AND p.id < q.id))

(a probe of the index ``ix_event_queue_order``). The key's head is
the only event of the key any worker can take; while one worker holds it, its
row lock makes the others skip it, and the next event of the key is not the
head until the head's outcome has committed. So one key's events are applied
one at a time, in receipt order (:mod:`idemhook._engine.accept` makes ``id`` order commit
order per key), while different keys run in parallel on any number of workers.
A failing head waiting for its backoff blocks its key (a later change must not
overtake an earlier one); ``failed`` (or ``rejected``, ``processed``) ends it and
unblocks the key. No advisory lock is held by workers: a lock alone would keep
a key's events apart but not in order (the head in its backoff would be
overtaken), and the head check alone already keeps them apart.

**A worker that dies holding an event** (SIGKILL, the OOM killer, a crash in
native code) loses its transaction, and the next worker takes the event at once.
An event that kills every worker that runs it must not do so forever: before its
handlers run, each take is counted (``processed_events.interruptions + 1``) in a
transaction of its own, on a second lane, and taken back in the batch's commit.
What remains is the number of workers that ended while they held the event. An
event with interruptions is taken alone (so that the events beside it are not
blamed with it), and one with :data:`MAX_INTERRUPTIONS` is not run again: it ends
``failed`` with a ``delivery_failures`` row saying so (``idemhook failures retry``
gives it a fresh start). PostgreSQL only: the demo's SQLite has one writer at a
time, and its worker runs in one process.

**Batches** grow while handlers are quick and shrink to one event when they are
slow (a running mean), so a slow event never keeps other events waiting in the
same transaction while another worker could run them. Between events the batch
stops early when the worker is stopping; the events it did not start are
released with the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError
from werkzeug.datastructures import Headers

from idemhook._config.freshness import Versioned
from idemhook._config.freshness import read as read_version
from idemhook._config.sources import Source
from idemhook._contract import (
    Event,
    StaleEvent,
)
from idemhook._engine import failures
from idemhook._engine.attempt import overrun, run, watched
from idemhook._engine.dispatch import HandlerRun, run_handlers, stale_handlers
from idemhook._engine.logs import log_fields
from idemhook._engine.observing import AppliedObserver
from idemhook._engine.registry import (
    Registry,
)
from idemhook._engine.watchdog import Job, Watchdog
from idemhook._engine.worker import Worker, backoff, first_line
from idemhook._store.database import (
    Database,
)
from idemhook._store.engine import (
    is_disconnect,
)
from idemhook._store.event_queue import EventQueue, end_backend
from idemhook._store.lanes import Lane
from idemhook._store.notify import EVENTS_CHANNEL
from idemhook._values.errors import BadRequest, ServiceUnavailable
from idemhook._values.jsontext import (
    dumps,
    loads,
)
from idemhook._values.outcome import Status

log = logging.getLogger("idemhook.events")

DEFAULT_BATCH = 50
#: Claim threads a worker may have stuck in handlers that overran before it waits.
WATCHED_THREADS = 4
#: A batch is sized to run its handlers in about this long (a running mean per event).
BATCH_SECONDS = 0.05
#: Workers an event may take down (ended while they held it) before it ends ``failed``.
MAX_INTERRUPTIONS = 3


@dataclass(slots=True)
class _Taken:
    """One received event as the take returned it."""

    row_id: int
    source: str
    event: Event
    attempts: int
    #: Workers that ended while they held this event (PostgreSQL; 0 on SQLite).
    interruptions: int = 0
    #: A source with ``freshness``: the event's object and version, read from its payload
    #: and stored headers as at intake; or why they could not be read (a failed attempt).
    versioned: Versioned | None = None
    unreadable: BadRequest | None = None


@dataclass(slots=True)
class _Applied:
    """What one attempt at one event came to (logged and counted after the commit)."""

    taken: _Taken
    outcome: str  # processed, ignored, rejected, stale, retry, failed
    seconds: float
    run: HandlerRun | None = None
    delay: float | None = None
    #: False for an event ended without running its handlers (too many interruptions).
    ran: bool = True


@dataclass(slots=True)
class _Batch:
    #: Every claim thread holds a handler that overran: nothing was taken.
    busy: bool = False
    #: (queue id, status, result as JSON text) of finished events, stored by one statement
    #: sent with the COMMIT.
    stored: list[tuple[int, Status, str]] = field(default_factory=list)
    #: Queue rows of finished events (stored, or failed for good), deleted with the COMMIT.
    done: list[int] = field(default_factory=list)
    #: ``delivery_failures`` rows, written in the batch's transaction, before its COMMIT.
    failures: list[dict[str, Any]] = field(default_factory=list)
    applied: list[_Applied] = field(default_factory=list)
    #: Events whose take was counted in ``interruptions`` (taken back with the COMMIT).
    counted: list[int] = field(default_factory=list)


class Applier:
    """The worker's kind of work that applies asynchronous sources' received events."""

    name = "events"
    channels = (EVENTS_CHANNEL,)

    def __init__(
        self,
        database: Database,
        registry: Registry,
        sources: Mapping[str, Source],
        *,
        batch: int = DEFAULT_BATCH,
        metrics: AppliedObserver | None = None,
        handler_timeout_ms: int | None = None,
    ) -> None:
        self.database = database
        self.registry = registry
        self.sources = dict(sources)
        self.metrics = metrics
        self.max_batch = max(1, batch)
        self.batch = 1  # grows while handlers are quick
        self._handler_seconds: float | None = None  # running mean per event
        self.queue = EventQueue(database.engine.dialect, sorted(self.sources))
        self._postgresql = self.queue.postgresql
        #: The handler deadline (PostgreSQL: the watchdog can end a stuck session).
        self.watchdog = (
            Watchdog(handler_timeout_ms, threads=WATCHED_THREADS)
            if handler_timeout_ms and self._postgresql
            else None
        )
        self._overrun: _Batch | None = None
        #: Counted takes of batches lost to an error, given back before the next batch.
        self._take_back: list[int] = []

    # -- the straight line ---------------------------------------------------------------------

    def step(self, worker: Worker) -> float | None:
        if not self.sources:
            return None
        batch = self.run_batch(worker)
        if batch is None:
            return self.queue.next_due(self.database.lanes)
        if batch.busy:
            return None  # the poll: a claim thread may be free by then
        self.report(batch)
        return 0.0

    def release(self) -> None:
        """Nothing to give back: what a batch took is released when its transaction ends."""

    def run_batch(self, worker: Worker) -> _Batch | None:
        """Take, run and record one batch; None when nothing was due.

        With a handler deadline, the batch runs on a claim thread watched by this
        one (:mod:`idemhook._engine.watchdog`): a handler that overruns it is given up on
        (:meth:`_Round.overran`), and its transaction never commits.
        """
        if self._take_back:
            self.queue.give_back_takes(self.database.lanes, self._take_back)
            self._take_back = []
        round_ = _Round(self, worker)
        if self.watchdog is None:
            return run(round_, Job())
        try:
            return watched(self.watchdog, round_, on_overrun=round_.overran)
        except ServiceUnavailable as exc:
            overrun, self._overrun = self._overrun, None
            if overrun is not None:  # handler_timeout: the attempt is recorded
                return overrun
            log.error(
                "every claim thread holds a handler that overran and has not returned "
                "(%s); waiting",
                exc.code,
            )
            return _Batch(busy=True)

    def _in_version_order(self, runnable: list[_Taken]) -> list[_Taken]:
        """Read the object and version of each event of a source with ``freshness``, and
        apply those in object and version order, as the claim does: two workers
        never wait on each other's objects crosswise, and a batch's events of one object
        go oldest first."""
        versioned = False
        for taken in runnable:
            freshness = self.sources[taken.source].freshness
            if freshness is None:
                continue
            versioned = True
            event = taken.event
            try:
                taken.versioned = read_version(freshness, event.payload, event.headers)
            except BadRequest as exc:  # accepted before the source's freshness was set
                taken.unreadable = exc
        if not versioned:
            return runnable
        return sorted(
            runnable, key=lambda t: (t.source, *t.versioned) if t.versioned else (t.source, "", 0)
        )

    def _resize(self, batch: _Batch) -> None:
        """Grow the batch while handlers are quick; one event at a time when they are slow."""
        ran = [a.seconds for a in batch.applied if a.run is not None]
        if ran:
            mean = sum(ran) / len(ran)
            known = self._handler_seconds
            self._handler_seconds = mean if known is None else 0.7 * known + 0.3 * mean
        per_event = self._handler_seconds or 0.0
        fits = int(BATCH_SECONDS / per_event) if per_event > 0 else self.max_batch
        self.batch = max(1, min(self.max_batch, fits, self.batch * 2))

    def _failed(
        self, lane: Lane, taken: _Taken, run: HandlerRun, seconds: float, batch: _Batch
    ) -> None:
        """Count the failed attempt: due again after a backoff, or ``failed`` at the limit."""
        batch.failures.append(_failure(taken, run))
        retries = self.sources[taken.source].retries
        attempt = taken.attempts + 1
        if attempt >= retries.max_attempts:
            status, delay, result = Status.FAILED, None, dumps({"failed": run.summary})
            batch.done.append(taken.row_id)
        else:
            status, result = Status.RECEIVED, None
            delay = backoff(attempt, retries.backoff_seconds, retries.max_backoff_seconds)
        self.queue.attempt_failed(lane, taken.row_id, str(status), result, delay)
        outcome = "failed" if status is Status.FAILED else "retry"
        batch.applied.append(_Applied(taken, outcome, seconds, run, delay))

    def _closing(self, lane: Lane, batch: _Batch) -> tuple[str | None, dict[str, Any] | None]:
        return self.queue.closing(
            lane,
            failures=batch.failures,
            counted=batch.counted,
            done=batch.done,
            stored=[(i, str(status), text) for i, status, text in batch.stored],
        )

    def _record_alone(
        self, taken: _Taken, run: HandlerRun, seconds: float, batch: _Batch
    ) -> _Batch:
        """Record one failed attempt at ``taken`` in a transaction of its own."""
        with self.database.lanes.lane() as lane:
            lane.begin()
            try:
                # Waits (up to the lock timeout) for a session that held it to let go.
                self.queue.lock(lane, taken.row_id)
                self._failed(lane, taken, run, seconds, batch)
                lane.commit(*self._closing(lane, batch))
            finally:
                if lane.in_transaction:
                    lane.rollback()
        return batch

    # -- telling -------------------------------------------------------------------------------

    def report(self, batch: _Batch) -> None:
        """After the commit: a log line and metrics per attempt."""
        for applied in batch.applied:
            self._report(applied)

    def _report(self, applied: _Applied) -> None:
        event = applied.taken.event
        delay_ms = None
        if applied.outcome in ("processed", "ignored", "rejected", "stale"):
            delay = (datetime.now(UTC) - event.received_at).total_seconds()
            delay_ms = round(delay * 1000, 2)
            if self.metrics is not None:
                self.metrics.observe_delay(event.source, delay)
        if self.metrics is not None:
            seconds = applied.seconds if applied.run is not None and applied.ran else None
            self.metrics.observe_applied(event, applied.outcome, seconds)
        fields: dict[str, Any] = {
            "source": event.source,
            "event_id": event.id,
            "event_type": event.type,
            "outcome": applied.outcome,
            "attempt": applied.taken.attempts + 1,
            "duration_ms": round(applied.seconds * 1000, 2),
        }
        if delay_ms is not None:
            fields["delay_ms"] = delay_ms
        run = applied.run
        if run is not None and run.handler is not None and applied.outcome != "processed":
            fields["handler"] = run.handler
        if run is not None and run.error is not None and applied.outcome in ("retry", "failed"):
            fields["error"] = type(run.error).__name__
        if applied.delay is not None:
            fields["retry_in_s"] = round(applied.delay, 3)
        level = logging.INFO
        if applied.outcome == "retry":
            level = logging.WARNING
        elif applied.outcome == "failed":
            level = logging.ERROR
        log_fields(log, level, fields)


class _Round:
    """One batch: an :class:`~idemhook._engine.attempt.Attempt` (the bracket decides faults)."""

    def __init__(self, applier: Applier, worker: Worker) -> None:
        self.applier = applier
        self.worker = worker
        self.batch = _Batch()
        #: The event whose handlers run now: charged an interruption if they cost the session.
        self.in_hand: _Taken | None = None

    def once(self, job: Job) -> _Batch | None:
        applier = self.applier
        batch = self.batch = _Batch()
        try:
            return self._batch(job, batch)
        except BaseException:
            # Lost with the connection (a restart), or an error of ours: given back before
            # the next batch (a COMMIT that did get through gave them back already: the
            # statement stops at 0). The bracket charges the event in hand when its own
            # handlers cost the session (:meth:`resolve`).
            if not job.abandoned:  # else: given back by overran
                applier._take_back.extend(batch.counted)
            raise

    def _batch(self, job: Job, batch: _Batch) -> _Batch | None:
        applier = self.applier
        with applier.database.lanes.lane() as lane:
            lane.begin()
            try:
                rows = applier.queue.take(lane, applier.batch)
                if not rows:
                    lane.rollback()
                    return None
                if applier._postgresql:
                    job.backend = rows[0][-1]  # pg_backend_pid(): who holds the locks
                taken = _suspects_alone([_taken(row) for row in rows])
                runnable = [e for e in taken if e.interruptions < MAX_INTERRUPTIONS]
                for event in taken:
                    if event.interruptions >= MAX_INTERRUPTIONS:
                        _given_up(event, batch)
                if applier._postgresql and runnable:
                    self._count_takes(batch, runnable)
                runnable = applier._in_version_order(runnable)
                for event in runnable:
                    if self.worker.stopping or job.abandoned:
                        break  # the event in hand is done; the rest are released
                    self._event(lane, event, batch, job)
                if not job.may_commit():  # given up on (a handler overran): roll back
                    lane.rollback()
                    return None
                lane.commit(*applier._closing(lane, batch))
            finally:
                if lane.in_transaction:
                    lane.rollback()
                lane.session.close()
        applier._resize(batch)
        return batch

    def _count_takes(self, batch: _Batch, runnable: list[_Taken]) -> None:
        """Count the takes of the events about to run, committed before any handler runs."""
        ids = [event.row_id for event in runnable]
        self.applier.queue.count_takes(self.applier.database.lanes, ids)
        batch.counted = ids
        for event in runnable:
            if event.interruptions:
                log.warning(
                    "event %s of %s: %d worker(s) ended while they held it; trying it alone "
                    "(at %d it ends failed)",
                    event.event.id,
                    event.source,
                    event.interruptions,
                    MAX_INTERRUPTIONS,
                )

    def _event(self, lane: Lane, taken: _Taken, batch: _Batch, job: Job) -> None:
        applier = self.applier
        event = taken.event
        registrations = applier.registry.for_event(event.source, event.type)
        if taken.unreadable is not None:
            run_ = HandlerRun(Status.FAILED, handler="idemhook freshness", error=taken.unreadable)
            applier._failed(lane, taken, run_, 0.0, batch)
            return
        if not registrations and taken.versioned is None:
            batch.stored.append((taken.row_id, Status.IGNORED, "null"))
            batch.done.append(taken.row_id)
            batch.applied.append(_Applied(taken, str(Status.IGNORED), 0.0))
            return
        stale = None
        if taken.versioned is None:
            # Sent at once: the handlers' statements go through the session, not the lane.
            lane.savepoint(now=True)
        else:
            # The savepoint leaves with the check of the event's version (one round trip).
            lane.savepoint()
            fresh = applier.queue.claims.fresh
            stale = fresh.check(lane, event.source, event.id, taken.versioned)
            if stale is not None:  # not newer than its object's version: stale
                registrations = stale_handlers(registrations)
                event = StaleEvent.of(event)
            if not registrations:
                status = Status.IGNORED if stale is None else Status.STALE
                result = "null" if stale is None else dumps({"newer": stale.newer})
                batch.stored.append((taken.row_id, status, result))
                batch.done.append(taken.row_id)
                batch.applied.append(_Applied(taken, str(status), 0.0))
                return
        started = time.perf_counter()
        job.handlers_started(taken)
        self.in_hand = taken
        run_ = run_handlers(registrations, event, lane.session, senders=applier.registry.senders)
        job.handlers_ended()
        seconds = time.perf_counter() - started
        if run_.status is Status.FAILED and is_disconnect(run_.error):
            raise run_.error  # type: ignore[misc]  # the lost session: the bracket decides
        self.in_hand = None
        if run_.status in (Status.PROCESSED, Status.IGNORED) and stale is not None:
            result = dumps({"newer": stale.newer, "handlers": run_.result}, strict=True)
            batch.stored.append((taken.row_id, Status.STALE, result))
            batch.done.append(taken.row_id)
            batch.applied.append(_Applied(taken, str(Status.STALE), seconds, run_))
            return
        if run_.status in (Status.PROCESSED, Status.IGNORED):
            batch.stored.append((taken.row_id, run_.status, run_.stored or "null"))
            batch.done.append(taken.row_id)
            batch.applied.append(_Applied(taken, str(run_.status), seconds, run_))
            return
        # Rejected or failed: undo this event's effects, keep the other events'.
        lane.session.close()
        lane.rollback_to_savepoint()
        if run_.status is Status.REJECTED:
            batch.failures.append(_failure(taken, run_))
            batch.stored.append((taken.row_id, Status.REJECTED, dumps(run_.result, strict=True)))
            batch.done.append(taken.row_id)
            batch.applied.append(_Applied(taken, str(Status.REJECTED), seconds, run_))
            return
        applier._failed(lane, taken, run_, seconds, batch)

    # -- what the bracket decided ----------------------------------------------------------------

    def resolve(self, lost: DBAPIError) -> _Batch:
        """The session was lost while a handler ran (or at the COMMIT): nothing of the
        batch is kept, unless the COMMIT landed.

        When the event in hand's own handlers cost the session (a statement that ended
        its backend, an OOM kill of it, a pooler's timeout), its counted take is kept: an
        interruption, as if the worker had died with it. It is then taken alone, and
        after :data:`MAX_INTERRUPTIONS` it ends ``failed``, while the other events flow.
        """
        applier, job_event = self.applier, self.in_hand
        self.in_hand = None
        if job_event is not None and job_event.row_id in applier._take_back:
            applier._take_back.remove(job_event.row_id)
            log.warning(
                "event %s of %s: the worker's database session was lost while its handlers "
                "ran (%s); counted as an interruption (at %d it ends failed)",
                job_event.event.id,
                job_event.source,
                first_line(lost),
                MAX_INTERRUPTIONS,
            )
        return _Batch()

    def refused(self, error: DBAPIError) -> _Batch:
        """PostgreSQL refused the COMMIT (a deferred constraint, a serialization failure).

        Nothing of the batch remains; each event it ran counts a failed attempt
        naming the COMMIT's error, in a transaction of its own, and the next batches
        take one event at a time, so that the event at fault is found.
        """
        applier, batch = self.applier, self.batch
        applier._take_back = [i for i in applier._take_back if i not in batch.counted]
        counted = _Batch(counted=batch.counted)  # the refused COMMIT gave no take back
        run_ = HandlerRun(Status.FAILED, handler="COMMIT", error=error)
        with applier.database.lanes.lane() as lane:
            lane.begin()
            try:
                for applied in batch.applied:
                    applier.queue.lock(lane, applied.taken.row_id)
                    applier._failed(lane, applied.taken, run_, applied.seconds, counted)
                lane.commit(*applier._closing(lane, counted))
            finally:
                if lane.in_transaction:
                    lane.rollback()
        applier.batch = applier.max_batch = 1
        applier._resize(counted)
        return counted

    def in_progress(self, error: DBAPIError) -> Exception:
        return error  # the worker's loop backs off and says so

    def unavailable(self, error: DBAPIError) -> Exception:
        return error  # the worker's loop backs off and says so

    def abandoned(self) -> _Batch | None:
        return None  # given up on by the watchdog: overran recorded the attempt

    def overran(self, job: Job) -> None:
        """A handler ran past the deadline: free its locks, count the attempt (main thread).

        Its transaction is marked abandoned and never commits; its database session
        is ended now (``pg_terminate_backend``), so the event's queue row is free,
        and the attempt is recorded like a handler's exception.
        """
        applier = self.applier
        taken: _Taken = job.event
        assert applier.watchdog is not None
        run_ = overrun(
            applier.watchdog,
            "IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS",
            "the worker gave up on them and their transaction was rolled back",
        )
        if job.backend is not None:
            end_backend(applier.database.engine, job.backend)
        # The abandoned batch never commits: its counted takes are taken back here.
        batch = _Batch(counted=self.batch.counted)
        applier._overrun = applier._record_alone(taken, run_, applier.watchdog.limit, batch)


def _suspects_alone(taken: list[_Taken]) -> list[_Taken]:
    """The batch to run: as taken, or only the first event that interrupted a worker.

    The others are released with the commit, uncounted: should the suspect kill
    this worker too, only its own count goes up.
    """
    if len(taken) > 1:
        for event in taken:
            if event.interruptions:
                return [event]
    return taken


def _given_up(taken: _Taken, batch: _Batch) -> None:
    """``failed`` without running: the event was held by every worker that ended."""
    error = RuntimeError(
        f"{taken.interruptions} idemhook worker processes ended (killed, out of memory, a "
        "crash) while they applied this event, or lost their database session in its "
        "handlers; it is not run again: `idemhook failures retry` gives it a fresh start"
    )
    run_ = HandlerRun(Status.FAILED, handler="idemhook worker", error=error)
    batch.failures.append(_failure(taken, run_))
    batch.stored.append((taken.row_id, Status.FAILED, dumps({"failed": run_.summary})))
    batch.done.append(taken.row_id)
    batch.applied.append(_Applied(taken, "failed", 0.0, run_, ran=False))


def _taken(row: Any) -> _Taken:
    row_id, source, event_id, event_type, payload, headers, received_at, attempts = row[:8]
    interruptions, tenant = row[8], row[9]
    if isinstance(received_at, str):  # SQLite hands back text through the lane
        received_at = datetime.fromisoformat(received_at)
    if received_at.tzinfo is None:
        received_at = received_at.replace(tzinfo=UTC)
    if isinstance(payload, str):
        payload = loads(payload)
    if isinstance(headers, str):
        headers = loads(headers)
    event = Event(
        source, event_id, event_type, payload, Headers(headers or {}), received_at, tenant
    )
    return _Taken(row_id, source, event, attempts, interruptions)


def _failure(taken: _Taken, run: HandlerRun) -> dict[str, Any]:
    # The worker never had the request's body: the event's JSON stands for it.
    return failures.failure_of(taken.event, run, dumps(taken.event.payload).encode())


class _Running:
    """A worker that never stops, for :func:`apply_due`."""

    stopping = False


def apply_due(app: Any, *, limit: int = 10_000) -> int:
    """Apply the received events of ``app``'s sources that are due now, in this process.

    What ``idemhook worker`` does, one batch after another until nothing is due
    (at most ``limit`` events): for tests (the test kit's ``Kit.apply_received``)
    and one-off runs. Returns how many attempts were made.
    """
    database = app.extensions["idemhook.db"]
    registry = app.extensions["idemhook.registry"]
    sources = app.extensions["idemhook.receiver"].sources
    applier = Applier(database, registry, sources, batch=DEFAULT_BATCH)
    attempts = 0
    while attempts < limit:
        batch = applier.run_batch(_Running())  # type: ignore[arg-type]
        if batch is None:
            break
        applier.report(batch)
        attempts += len(batch.applied)
    return attempts
