"""Applying received events: the worker's second kind of work (:class:`Applier`).

An asynchronous source's delivery left each event in ``processed_events`` with
status ``received`` (:mod:`app.accept`). ``idemhook worker`` applies them, a
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
   (:func:`app.dispatch.run_handlers`): the same ``Event`` (payload, stored
   headers, ``received_at``), the same session contract, ``event.outbox``.
3. **record** in the same transaction: ``processed`` or ``ignored`` with the
   result; ``rejected`` (effects rolled back to the savepoint, a permanent
   ``delivery_failures`` row); a handler that raised has its effects rolled back,
   a ``delivery_failures`` row, and is due again after :func:`app.worker.backoff`,
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
one at a time, in receipt order (:mod:`app.accept` makes ``id`` order commit
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
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Float,
    Integer,
    String,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError
from werkzeug.datastructures import Headers

from . import failures
from .accept import CHANNEL
from .db import Database, dumps, is_disconnect, loads
from .dispatch import HandlerRun, run_handlers
from .errors import ServiceUnavailable
from .lanes import Lane
from .logs import log_fields
from .models import delivery_failures, event_queue, processed_events
from .outcome import Status
from .plugins import Event, Registry
from .sources import Source
from .statements import ClaimStatements, _processor
from .watchdog import Job, Watchdog
from .worker import backoff

if TYPE_CHECKING:
    from .metrics import Metrics
    from .worker import Worker

log = logging.getLogger("idemhook.events")

DEFAULT_BATCH = 50
#: Claim threads a worker may have stuck in handlers that overran before it waits.
WATCHED_THREADS = 4
#: A batch is sized to run its handlers in about this long (a running mean per event).
BATCH_SECONDS = 0.05
#: Workers an event may take down (ended while they held it) before it ends ``failed``.
MAX_INTERRUPTIONS = 3
_RECEIVED = literal_column(f"'{Status.RECEIVED}'")


@dataclass(slots=True)
class _Taken:
    """One received event as the take returned it."""

    row_id: int
    source: str
    event: Event
    attempts: int
    #: Workers that ended while they held this event (PostgreSQL; 0 on SQLite).
    interruptions: int = 0


@dataclass(slots=True)
class _Applied:
    """What one attempt at one event came to (logged and counted after the commit)."""

    taken: _Taken
    outcome: str  # processed, ignored, rejected, retry, failed
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
    channels = (CHANNEL,)

    def __init__(
        self,
        database: Database,
        registry: Registry,
        sources: Mapping[str, Source],
        *,
        batch: int = DEFAULT_BATCH,
        metrics: Metrics | None = None,
        handler_timeout_ms: int | None = None,
    ) -> None:
        self.database = database
        self.registry = registry
        self.sources = dict(sources)
        self.metrics = metrics
        self.max_batch = max(1, batch)
        self.batch = 1  # grows while handlers are quick
        self._handler_seconds: float | None = None  # running mean per event
        dialect = database.engine.dialect
        self.statements = ClaimStatements(dialect)
        self._timestamp = _processor(processed_events.c.received_at.type, dialect, bind=True)
        names = sorted(self.sources)
        self._take_sql = _compile(_take(names, dialect.name == "postgresql"), dialect)
        self._next_due_sql = _compile(_next_due(names, dialect.name == "postgresql"), dialect)
        counted, due = _attempted(dialect.name == "postgresql")
        self._counted_sql, self._due_sql = _compile(counted, dialect), _compile(due, dialect)
        #: PostgreSQL: both in one message.
        self._counted_and_due_sql = "; ".join((self._counted_sql, self._due_sql))
        self._dequeue_sql = _compile(_dequeue(), dialect)
        self._lock_sql = _compile(_lock(), dialect)
        self._postgresql = dialect.name == "postgresql"
        #: The handler deadline (PostgreSQL: the watchdog can end a stuck session).
        self.watchdog = (
            Watchdog(handler_timeout_ms, threads=WATCHED_THREADS)
            if handler_timeout_ms and self._postgresql
            else None
        )
        self._overrun: _Batch | None = None
        #: The batch running now (:meth:`_overran` gives its counted takes back).
        self._running = _Batch()
        #: Counted takes of batches lost to an error, given back before the next batch.
        self._take_back: list[int] = []

    # -- the straight line ---------------------------------------------------------------------

    def step(self, worker: Worker) -> float | None:
        if not self.sources:
            return None
        batch = self._apply(worker)
        if batch is None:
            return self._next_due()
        if batch.busy:
            return None  # the poll: a claim thread may be free by then
        self._finish(batch)
        return 0.0

    def release(self) -> None:
        """Nothing to give back: what a batch took is released when its transaction ends."""

    # -- one batch, one transaction ------------------------------------------------------------

    def _apply(self, worker: Worker) -> _Batch | None:
        """Take, run and record one batch; None when nothing was due.

        With a handler deadline, the batch runs on a claim thread watched by this
        one (:mod:`app.watchdog`): a handler that overruns it is given up on
        (:meth:`_overran`), and its transaction never commits.
        """
        if self.watchdog is None:
            return self._transaction(worker, Job())
        try:
            return self.watchdog.run(
                lambda job: self._transaction(worker, job), on_overrun=self._overran
            )
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

    def _transaction(self, worker: Worker, job: Job) -> _Batch | None:
        if self._take_back:
            self._give_back_takes()
        batch = self._running = _Batch()
        try:
            return self._batch(worker, job, batch)
        except BaseException:
            # Lost with the connection (a restart), or an error of ours: not an interruption
            # of this event. Given back before the next batch (if the COMMIT did get through,
            # the count is back already: the statement stops at 0).
            if not job.abandoned:  # else: given back by _overran
                self._take_back.extend(batch.counted)
            raise

    def _give_back_takes(self) -> None:
        with self.database.lanes.lane() as side:
            side.execute_alone(_GIVE_BACK_PG, {"ids": self._take_back})
        self._take_back = []

    def _batch(self, worker: Worker, job: Job, batch: _Batch) -> _Batch | None:
        refused: DBAPIError | None = None
        with self.database.lanes.lane() as lane:
            lane.begin()
            try:
                params = {"limit": self.batch}
                if not self._postgresql:  # PostgreSQL compares with its own now()
                    params["now"] = self._timestamp(datetime.now(UTC))
                rows = lane.execute(self._take_sql, params).fetchall()
                if not rows:
                    lane.rollback()
                    return None
                if self._postgresql:
                    job.backend = rows[0][-1]  # pg_backend_pid(): who holds the locks
                taken = self._suspects_alone([self._taken(row) for row in rows])
                runnable = [e for e in taken if e.interruptions < MAX_INTERRUPTIONS]
                for event in taken:
                    if event.interruptions >= MAX_INTERRUPTIONS:
                        self._given_up(event, batch)
                if self._postgresql and runnable:
                    self._count_takes(batch, runnable)
                for event in runnable:
                    if worker.stopping or job.abandoned:
                        break  # the event in hand is done; the rest are released
                    self._event(lane, event, batch, job)
                if not job.may_commit():  # given up on (a handler overran): roll back
                    lane.rollback()
                    return None
                try:
                    lane.commit(*self._closing(lane, batch))
                except DBAPIError as exc:
                    if is_disconnect(exc):
                        raise
                    lane.rollback()
                    refused = exc
            finally:
                if lane.in_transaction:
                    lane.rollback()
                lane.session.close()
        if refused is not None:
            batch = self._commit_refused(batch, refused)
        self._resize(batch)
        return batch

    def _suspects_alone(self, taken: list[_Taken]) -> list[_Taken]:
        """The batch to run: as taken, or only the first event that interrupted a worker.

        The others are released with the commit, uncounted: should the suspect kill
        this worker too, only its own count goes up.
        """
        if len(taken) > 1:
            for event in taken:
                if event.interruptions:
                    return [event]
        return taken

    def _count_takes(self, batch: _Batch, runnable: list[_Taken]) -> None:
        """Count the takes of the events about to run, committed before any handler runs."""
        ids = [event.row_id for event in runnable]
        with self.database.lanes.lane() as side:
            side.execute_alone(_COUNT_TAKES_PG, {"ids": ids})
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

    def _given_up(self, taken: _Taken, batch: _Batch) -> None:
        """``failed`` without running: the event was held by every worker that ended."""
        error = RuntimeError(
            f"{taken.interruptions} idemhook worker processes ended (killed, out of memory, "
            "a crash) while they applied this event; it is not run again: `idemhook "
            "failures retry` gives it a fresh start"
        )
        run = HandlerRun(Status.FAILED, handler="idemhook worker", error=error)
        batch.failures.append(_failure(taken, run))
        batch.stored.append((taken.row_id, Status.FAILED, dumps({"failed": run.summary})))
        batch.done.append(taken.row_id)
        batch.applied.append(_Applied(taken, "failed", 0.0, run, ran=False))

    def _closing(self, lane: Lane, batch: _Batch) -> tuple[str | None, dict[str, Any] | None]:
        """The statements sent with the COMMIT: dequeue finished events, store results.

        ``processed_at`` is the time of the commit for every event of the batch: when
        its handlers' work became visible (PostgreSQL: ``clock_timestamp()``). The
        batch's failure rows are written first, in the same transaction (one
        statement; only a batch with a failed or rejected attempt has any).
        """
        if batch.failures:
            lane.connection.execute(insert(delivery_failures), batch.failures)
        if not batch.stored and not batch.done and not batch.counted:
            return None, None
        if self._postgresql:
            params = {
                "counted": batch.counted,
                "done": batch.done,
                "ids": [row_id for row_id, _, _ in batch.stored],
                "statuses": [str(status) for _, status, _ in batch.stored],
                "results": [result for _, _, result in batch.stored],
            }
            return _FINISH_PG, params
        for row_id in batch.done:
            lane.execute(self._dequeue_sql, {"row_id": row_id})
        if not batch.stored:
            return None, None
        rows = [self.statements.result_row(i, status, text) for i, status, text in batch.stored]
        return self.statements.store(rows)

    def _taken(self, row: Any) -> _Taken:
        row_id, source, event_id, event_type, payload, headers, received_at, attempts = row[:8]
        interruptions = row[8]
        if isinstance(received_at, str):  # SQLite hands back text through the lane
            received_at = datetime.fromisoformat(received_at)
        if received_at.tzinfo is None:
            received_at = received_at.replace(tzinfo=UTC)
        if isinstance(payload, str):
            payload = loads(payload)
        if isinstance(headers, str):
            headers = loads(headers)
        event = Event(source, event_id, event_type, payload, Headers(headers or {}), received_at)
        return _Taken(row_id, source, event, attempts, interruptions)

    def _event(self, lane: Lane, taken: _Taken, batch: _Batch, job: Job) -> None:
        event = taken.event
        registrations = self.registry.for_event(event.source, event.type)
        if not registrations:
            batch.stored.append((taken.row_id, Status.IGNORED, "null"))
            batch.done.append(taken.row_id)
            batch.applied.append(_Applied(taken, str(Status.IGNORED), 0.0))
            return
        # Sent at once: the handlers' statements go through the session, not the lane.
        lane.savepoint(now=True)
        started = time.perf_counter()
        job.handlers_started(taken)
        run = run_handlers(registrations, event, lane.session, senders=self.registry.senders)
        job.handlers_ended()
        seconds = time.perf_counter() - started
        if run.status is Status.FAILED and is_disconnect(run.error):
            raise run.error  # type: ignore[misc]  # the worker loop backs off; nothing kept
        if run.status in (Status.PROCESSED, Status.IGNORED):
            batch.stored.append((taken.row_id, run.status, run.stored or "null"))
            batch.done.append(taken.row_id)
            batch.applied.append(_Applied(taken, str(run.status), seconds, run))
            return
        # Rejected or failed: undo this event's effects, keep the other events'.
        lane.session.close()
        lane.rollback_to_savepoint()
        if run.status is Status.REJECTED:
            batch.failures.append(_failure(taken, run))
            batch.stored.append((taken.row_id, Status.REJECTED, dumps(run.result, strict=True)))
            batch.done.append(taken.row_id)
            batch.applied.append(_Applied(taken, str(Status.REJECTED), seconds, run))
            return
        self._failed(lane, taken, run, seconds, batch)

    def _failed(
        self, lane: Lane, taken: _Taken, run: HandlerRun, seconds: float, batch: _Batch
    ) -> None:
        """Count the failed attempt: due again after a backoff, or ``failed`` at the limit."""
        batch.failures.append(_failure(taken, run))
        retries = self.sources[taken.source].retries
        attempt = taken.attempts + 1
        if attempt >= retries.max_attempts:
            status, delay, result = Status.FAILED, None, dumps({"failed": run.summary})
        else:
            status, result = Status.RECEIVED, None
            delay = backoff(attempt, retries.backoff_seconds, retries.max_backoff_seconds)
        params: dict[str, Any] = {
            "row_id": taken.row_id,
            "status": str(status),
            "result": result,
            "delay": delay or 0.0,
        }
        if not self._postgresql:  # PostgreSQL: now() + the delay, its own clock
            due = datetime.now(UTC) + timedelta(seconds=delay or 0.0)
            params["next_attempt_at"] = self._timestamp(due)
        if status is Status.FAILED:
            lane.execute(self._counted_sql, params)
            batch.done.append(taken.row_id)
        elif self._postgresql:
            lane.execute(self._counted_and_due_sql, params)
        else:
            lane.execute(self._counted_sql, params)
            lane.execute(self._due_sql, params)
        outcome = "failed" if status is Status.FAILED else "retry"
        batch.applied.append(_Applied(taken, outcome, seconds, run, delay))

    def _commit_refused(self, batch: _Batch, error: DBAPIError) -> _Batch:
        """PostgreSQL refused the COMMIT (a deferred constraint, a serialization failure).

        Nothing of the batch remains; each event it ran counts a failed attempt
        naming the COMMIT's error, in a transaction of its own, and the next batches
        take one event at a time, so that the event at fault is found.
        """
        counted = _Batch(counted=batch.counted)  # the refused COMMIT gave no take back
        run = HandlerRun(Status.FAILED, handler="COMMIT", error=error)
        with self.database.lanes.lane() as lane:
            lane.begin()
            try:
                for applied in batch.applied:
                    lane.execute(self._lock_sql, {"row_id": applied.taken.row_id})
                    self._failed(lane, applied.taken, run, applied.seconds, counted)
                lane.commit(*self._closing(lane, counted))
            finally:
                if lane.in_transaction:
                    lane.rollback()
        self.batch = self.max_batch = 1
        return counted

    def _overran(self, job: Job) -> None:
        """A handler ran past the deadline: free its locks, count the attempt (main thread).

        Its transaction is marked abandoned and never commits; its database session
        is ended now (``pg_terminate_backend``), so the event's queue row is free,
        and the attempt is recorded like a handler's exception.
        """
        taken: _Taken = job.event
        limit = round(self.watchdog.limit * 1000) if self.watchdog else 0
        error = TimeoutError(
            f"the handlers ran longer than IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS ({limit} ms); "
            "the worker gave up on them and their transaction was rolled back"
        )
        run = HandlerRun(Status.FAILED, handler="handlers", error=error)
        backend = getattr(job, "backend", None)
        if backend is not None:
            with self.database.engine.connect() as conn:
                conn.execute(select(func.pg_terminate_backend(backend)))
        # The abandoned batch never commits: its counted takes are taken back here.
        batch = _Batch(counted=self._running.counted)
        with self.database.lanes.lane() as lane:
            lane.begin()
            try:
                # Waits (up to the lock timeout) for the ended session to let go of the row.
                lane.execute(self._lock_sql, {"row_id": taken.row_id})
                self._failed(lane, taken, run, self.watchdog.limit if self.watchdog else 0, batch)
                lane.commit(*self._closing(lane, batch))
            finally:
                if lane.in_transaction:
                    lane.rollback()
        self._overrun = batch

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

    def _next_due(self) -> float | None:
        """Seconds until the earliest received event due later falls due (None: none).

        Events due now that the take did not return are held by another worker or
        wait behind an earlier event of their order key: the worker that finishes
        those takes again at once.
        """
        with self.database.lanes.lane() as lane:
            if lane.pipelined:  # seconds from PostgreSQL's now()
                [(seconds,)] = lane.execute_alone(self._next_due_sql).fetchall()
                return None if seconds is None else max(0.0, float(seconds))
            now = datetime.now(UTC)
            lane.begin()
            try:
                row = lane.execute(self._next_due_sql, {"now": self._timestamp(now)}).fetchone()
            finally:
                lane.rollback()
        due = row[0] if row else None
        if due is None:
            return None
        if isinstance(due, str):
            due = datetime.fromisoformat(due)
        if due.tzinfo is None:
            due = due.replace(tzinfo=UTC)
        return max(0.0, (due - now).total_seconds())

    # -- telling -------------------------------------------------------------------------------

    def _finish(self, batch: _Batch) -> None:
        """After the commit: a log line and metrics per attempt."""
        for applied in batch.applied:
            self._report(applied)

    def _report(self, applied: _Applied) -> None:
        event = applied.taken.event
        delay_ms = None
        if applied.outcome in ("processed", "ignored", "rejected"):
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


# -- the statements ----------------------------------------------------------------------------


def _take(sources: list[str], postgresql: bool) -> Any:
    q = event_queue.alias("q")
    p = event_queue.alias("p")
    e = processed_events.alias("e")
    earlier = exists().where(
        p.c.source == q.c.source,
        p.c.order_key == q.c.order_key,
        p.c.id < q.c.id,
    )
    columns = [
        q.c.id,
        e.c.source,
        e.c.event_id,
        e.c.event_type,
        e.c.payload,
        e.c.headers,
        e.c.received_at,
        e.c.attempts,
        e.c.interruptions,
    ]
    if postgresql:  # the session holding the locks, in case a handler overruns
        columns.append(func.pg_backend_pid())
    take = (
        select(*columns)
        .select_from(q.join(e, e.c.id == q.c.id))
        .where(
            q.c.next_attempt_at <= (func.now() if postgresql else bindparam("now", type_=String)),
            _among(q.c.source, sources),
            or_(q.c.order_key.is_(None), ~earlier),
        )
        .order_by(q.c.next_attempt_at, q.c.id)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True, of=q)
    )
    # SQLite's LIMIT wants an OFFSET, which would otherwise be a parameter of its own.
    return take if postgresql else take.offset(literal_column("0"))


def _lock() -> Any:
    q = event_queue
    return select(q.c.id).where(q.c.id == bindparam("row_id", type_=Integer)).with_for_update()


def _next_due(sources: list[str], postgresql: bool) -> Any:
    q = event_queue
    if postgresql:
        earliest = func.min(q.c.next_attempt_at)
        return select(func.extract("epoch", earliest - func.now())).where(
            q.c.next_attempt_at > func.now(), _among(q.c.source, sources)
        )
    return select(func.min(q.c.next_attempt_at)).where(
        q.c.next_attempt_at > bindparam("now", type_=String),
        _among(q.c.source, sources),
    )


def _attempted(postgresql: bool) -> tuple[Any, Any]:
    """A failed attempt: counted on the event (``failed`` at the limit); when due again."""
    t = processed_events
    counted = (
        update(t)
        .where(t.c.id == bindparam("row_id", type_=Integer))
        .values(
            attempts=t.c.attempts + literal_column("1"),
            status=bindparam("status", type_=String),
            result=bindparam("result", type_=String),
        )
    )
    q = event_queue
    if postgresql:  # now() + make_interval(0, ..., secs => delay)
        zero = literal_column("0")
        delay = func.make_interval(zero, zero, zero, zero, zero, zero, bindparam("delay", Float))
        when: Any = func.now() + delay
    else:
        when = bindparam("next_attempt_at", type_=String)
    due = update(q).where(q.c.id == bindparam("row_id", type_=Integer)).values(next_attempt_at=when)
    return counted, due


def _dequeue() -> Any:
    q = event_queue
    return delete(q).where(q.c.id == bindparam("row_id", type_=Integer))


def _failure(taken: _Taken, run: HandlerRun) -> dict[str, Any]:
    """The ``delivery_failures`` row of a failed or rejected attempt."""
    return failures.failure_row(
        taken.event,
        error=run.error_text,
        cause=run.error or RuntimeError(run.error_text),
        # The worker never had the request's body: the event's JSON stands for it.
        raw_body=dumps(taken.event.payload).encode(),
        permanent=run.status is Status.REJECTED,
    )


def _among(column: Any, names: list[str]) -> Any:
    # Source names are [A-Za-z0-9_.-] (app.sources): written into the SQL, compiled once.
    return column.in_([literal_column(f"'{name}'") for name in names])


def _compile(statement: Any, dialect: Any) -> str:
    compiled = statement.compile(dialect=dialect)
    unnamed = [name for name in compiled.params if name not in _PARAMETERS]
    if unnamed:  # a literal compiled in as a parameter would never be passed
        raise RuntimeError(f"parameters {unnamed} would not be passed: {compiled}")
    return str(compiled)


#: The parameters the worker's statements are given.
_PARAMETERS = frozenset(
    {"now", "limit", "row_id", "status", "result", "delay", "next_attempt_at"}
)
#: Sent with a batch's COMMIT: its counted takes taken back; its finished events leave the
#: queue; their results stored.
_FINISH_PG = (
    "UPDATE processed_events SET interruptions = interruptions - 1 "
    "WHERE id = ANY(CAST(%(counted)s AS bigint[])); "
    "DELETE FROM event_queue WHERE id = ANY(%(done)s); "
    "UPDATE processed_events AS e SET status = v.status, result = CAST(v.result AS jsonb), "
    "processed_at = clock_timestamp() "
    "FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(statuses)s AS text[]), "
    "CAST(%(results)s AS text[])) AS v(id, status, result) WHERE e.id = v.id"
)


#: A batch's takes, counted in a transaction of their own before its handlers run.
_COUNT_TAKES_PG = (
    "UPDATE processed_events SET interruptions = interruptions + 1 "
    "WHERE id = ANY(CAST(%(ids)s AS bigint[]))"
)


#: Takes of a batch lost to an error (not to the worker's end), given back; never below 0.
_GIVE_BACK_PG = (
    "UPDATE processed_events SET interruptions = GREATEST(interruptions - 1, 0) "
    "WHERE id = ANY(CAST(%(ids)s AS bigint[]))"
)


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
        batch = applier._apply(_Running())  # type: ignore[arg-type]
        if batch is None:
            break
        applier._finish(batch)
        attempts += len(batch.applied)
    return attempts
