"""The claim of an ``idempotency-key`` request: lease the key, run the operation, store its answer.

A client's retry must get the first request's answer, and a retry that arrives while
the first request still runs must hear ``409`` at once, without waiting on it. So,
unlike a webhook's claim (one transaction, :mod:`app.claim`), a key is claimed in
two transactions, on one lane (:mod:`app.lanes`):

1. **lease** (short, committed at once, ``synchronous_commit`` off): the key's row is
   inserted as ``in_flight`` with ``locked_until`` (the lease) and ``lock_owner`` (this
   request), or taken over when its ``key_ttl`` has passed (an expired key is a new
   request) or its lease has (the request that held it crashed). A key that is done
   and unexpired has its replay counted instead; anything else is left alone. The
   row is then read in the second transaction, which the same message opens: no
   extra round trip.
2. **operation**: ours, the handlers run (:func:`app.dispatch.run_handlers`) and their
   answer is stored and committed with their work; someone else's, the request is
   answered from the row: ``409`` while it is in flight, ``422`` for another
   request's fingerprint, else the stored answer, replayed.

Exactly once rests on the unique ``(source, event_id)`` and on the finishing
statement: it writes a status the table's CHECK refuses unless the lease is still
this request's, so a request whose lease was taken over can never commit its work.
A handler that raises rolls its work back and deletes the claim: the key is free
for the retry. A request that dies while in flight leaves its lease, which expires
after the longest a claim can live (the handler timeout plus twice the statement
timeout, :meth:`KeyClaimer.lease_seconds`); then the next request with the key runs it.

Nothing outlives a transaction (``SET LOCAL`` only): the same holds behind a
transaction-mode pooler.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import DBAPIError

from . import failures
from .claim import Claimer
from .db import dumps, is_disconnect, loads
from .dispatch import HandlerRun, run_handlers
from .errors import Conflict, HandlerFailed, ServiceUnavailable, UnprocessableContent
from .lanes import Lane
from .models import processed_events
from .outcome import Outcome, Status
from .plugins import Event, Response
from .schemes.idempotency_key import KEY_HEADER
from .statements import KeyRow, KeyStatements
from .watchdog import Job

#: The status a handler's ``Reject`` is answered with (and replayed): the request can never
#: succeed as it is.
REJECTED_STATUS = 422
#: SQLSTATE of a CHECK violation, and the constraint the lease guard trips.
_CHECK_VIOLATION = "23514"
_STATUS_CHECK = "ck_processed_events_status"


@dataclass(frozen=True, slots=True)
class Answer:
    """The HTTP answer of an operation: the first one, or its replay."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """One verified request of an ``idempotency-key`` source."""

    event: Event
    #: The key as the client sent it (``event.id`` is scoped by the client: ``acme:<key>``).
    key: str
    #: ``sha256:...`` of the request, or None (``fingerprint = false``).
    fingerprint: str | None
    raw_body: bytes
    #: Seconds the key stays taken once claimed (the source's ``key_ttl``).
    key_ttl: int


class KeyClaimer:
    """Claims keys and runs operations with the claimer's registry, watchdog and observers."""

    def __init__(self, claimer: Claimer) -> None:
        self.claimer = claimer
        self.database = claimer.database
        engine = self.database.engine
        self.statements = KeyStatements(engine.dialect)
        self._postgresql = engine.dialect.name == "postgresql"
        timeouts = self.database.timeouts
        statement_ms = timeouts.statement_ms if timeouts else 2000
        #: How long a lease holds: longer than any claim can live. Past the handler timeout
        #: the claim is abandoned and never commits; a statement (or the COMMIT) in flight
        #: then still has the statement timeout; and one more for the clocks of instances.
        self.lease_seconds = (claimer.watchdog.limit * 1000 + 2 * statement_ms) / 1000 + 1
        # The lease commits in its own transaction, without waiting for its WAL flush: a
        # crash that loses it loses the request that held it too. The operation's COMMIT
        # flushes the WAL up to it.
        self._lease_prefix = "SET LOCAL synchronous_commit TO OFF; "
        self._begin = self.database.lanes.begin_sql

    # -- the straight line ---------------------------------------------------------------------

    def apply(self, request: KeyRequest) -> Answer:
        """Claim the key and run the operation, or answer from the key (409, 422, replay)."""
        owner = uuid.uuid4().hex
        answer = self.claimer.watchdog.run(
            lambda job: self._apply(request, owner, job),
            on_overrun=lambda job: self._overran(request, job),
        )
        if answer is None:  # pragma: no cover (only an abandoned claim returns None)
            raise ServiceUnavailable("The operation was abandoned; retry shortly.")
        return answer

    def _apply(self, request: KeyRequest, owner: str, job: Job) -> Answer | None:
        try:
            return self._attempt(request, owner, job)
        except DBAPIError as exc:
            if job.abandoned:
                self._release_quietly(request, owner)
                return None
            if not is_disconnect(exc):
                raise
            if job.handlers_ran:
                return self._after_lost_connection(request, owner, exc)
        # Lost before any handler started (a kept connection that did not survive a
        # database restart): try once more with the same owner, which takes its own lease
        # back if the first try's did commit.
        try:
            return self._attempt(request, owner, job)
        except DBAPIError as exc:
            if is_disconnect(exc):
                return self._after_lost_connection(request, owner, exc)
            raise

    def _attempt(self, request: KeyRequest, owner: str, job: Job) -> Answer | None:
        event = request.event
        params = self._params(request, owner)
        with self.database.lanes.lane() as lane:
            lane.begin()
            try:
                started = time.perf_counter()
                try:
                    row = self._lease(lane, params)
                except DBAPIError as exc:
                    if _is_timeout(exc) and not is_disconnect(exc):
                        # Its row is locked (an operator's `events replay` of the key).
                        raise _in_use(request, "its row is locked by another operation") from exc
                    raise
                self._time(event, "claim", started)
                if row is None or row.lock_owner != owner:
                    lane.rollback()
                    return self._answer_from(request, row, started)
                return self._operate(lane, request, row.id, owner, job, started)
            finally:
                if lane.in_transaction:
                    lane.rollback()
                lane.session.close()

    # -- the two transactions ------------------------------------------------------------------

    def _lease(self, lane: Lane, params: dict[str, Any]) -> KeyRow | None:
        """Count a replay or claim the key (committed), then read it in a new transaction."""
        s = self.statements
        if self._postgresql:
            sql = (
                f"{self._lease_prefix}{s.count_sql}; {s.lease_sql}; COMMIT; "
                f"{self._begin}{s.read_sql}"
            )
            return s.key_row(lane.execute(sql, params).fetchone())
        lane.execute(s.count_sql, params)
        lane.execute(s.lease_sql, params)
        lane.commit()
        lane.begin()
        return s.key_row(lane.execute(s.read_sql, params).fetchone())

    def _operate(
        self, lane: Lane, request: KeyRequest, row_id: int, owner: str, job: Job, started: float
    ) -> Answer | None:
        """Run the handlers in the open transaction and store their answer with their work."""
        event = request.event
        registrations = self.claimer.registry.for_event(event.source, event.type)
        if registrations:
            job.handlers_started(event)
            handlers_started = time.perf_counter()
            run = run_handlers(
                registrations, event, lane.session, senders=self.claimer.registry.senders
            )
            job.handlers_ended()
            self._time(event, "handlers", handlers_started)
        else:
            run = HandlerRun(Status.IGNORED, None, "null")
        if run.status is Status.FAILED:
            if is_disconnect(run.error):
                raise run.error  # type: ignore[misc]  # the lost connection, handled by _apply
            lane.session.close()
            lane.rollback()
            self._release(lane, row_id, owner)
            raise self._failed(request, run, started)
        if run.status is Status.REJECTED:
            # Its work is undone; the key is kept, answered as rejected from now on.
            lane.session.close()
            lane.rollback()
            lane.begin()
            answer = Answer(REJECTED_STATUS, run.result)
            stored = dumps(run.result, strict=True)
        else:
            response = run.response or Response(200)
            stored = run.stored or "null"
            # Answered as every replay will be: the body as it is stored.
            answer = Answer(response.status, loads(stored), response.headers)
        params = {
            "row_id": row_id,
            "lock_owner": owner,
            "status": str(run.status),
            "result": stored,
            "response_status": answer.status,
            "response_headers": dumps([list(pair) for pair in answer.headers]),
            "processed_at": self.statements.timestamp(datetime.now(UTC)),
        }
        if not job.may_commit():  # answered handler_timeout already: keep nothing
            lane.session.close()
            lane.rollback()
            self._release(lane, row_id, owner)
            return None
        try:
            lane.commit(self.statements.finish_sql, params)
        except DBAPIError as exc:
            if is_disconnect(exc):
                raise
            lane.rollback()
            if _lease_lost(exc):
                raise _in_use(request, "its lease ran out and another request took it") from exc
            # PostgreSQL refused the COMMIT (a deferred constraint): nothing was kept.
            self._release(lane, row_id, owner)
            commit = HandlerRun(Status.FAILED, handler="COMMIT", error=exc)
            raise self._failed(request, commit, started) from exc
        if run.status is Status.REJECTED:
            failures.record(self.database.engine, [_failure(request, run)])
        outcome = Outcome(event.id, run.status, answer.body, handler=run.handler)
        self._observe(event, outcome, started)
        return answer

    def _release(self, lane: Lane, row_id: int, owner: str) -> None:
        """Delete this request's claim (its transaction is over): the key is free again."""
        lane.begin()
        sql = self.statements.release_sql
        params = {"row_id": row_id, "lock_owner": owner}
        lane.commit(self._lease_prefix + sql if self._postgresql else sql, params)

    # -- answering from the key ----------------------------------------------------------------

    def _answer_from(self, request: KeyRequest, row: KeyRow | None, started: float) -> Answer:
        event = request.event
        if row is None or row.status == Status.IN_FLIGHT:
            raise _in_use(request, "a request with it is still running")
        if (
            row.fingerprint is not None
            and request.fingerprint is not None
            and row.fingerprint != request.fingerprint
        ):
            raise UnprocessableContent(
                f"The {KEY_HEADER} {request.key!r} was used for a different request (another "
                "method, path, Content-Type or body); nothing was run. Use a new key for a new "
                "request.",
                code="idempotency_key_mismatch",
            )
        self._observe(event, Outcome(event.id, Status.DUPLICATE, row.result), started)
        headers = tuple((str(name), str(value)) for name, value in row.response_headers or ())
        return Answer(row.response_status or 200, row.result, headers, replayed=True)

    def _after_lost_connection(
        self, request: KeyRequest, owner: str, lost: DBAPIError
    ) -> Answer:
        """The connection died at or after the handlers: answer from what committed, or 503."""
        event = request.event
        table = processed_events
        try:
            with self.database.engine.connect() as conn:
                row = conn.execute(
                    table.select().where(
                        table.c.source == event.source, table.c.event_id == event.id
                    )
                ).first()
                if row is not None and row.lock_owner == owner:
                    # Not committed: free the key for the client's retry.
                    conn.execute(table.delete().where(table.c.id == row.id))
                    conn.commit()
        except DBAPIError as exc:
            raise _unavailable() from exc
        if row is None or row.status == Status.IN_FLIGHT:
            raise _unavailable() from lost
        headers = tuple((str(n), str(v)) for n, v in row.response_headers or ())
        return Answer(row.response_status or 200, row.result, headers)

    # -- failures, overruns, observers -----------------------------------------------------------

    def _failed(self, request: KeyRequest, run: HandlerRun, started: float) -> HandlerFailed:
        """Record a failed operation; the error to answer (500, the key free)."""
        event = request.event
        failures.record(self.database.engine, [_failure(request, run)])
        outcome = Outcome(
            event.id,
            Status.FAILED,
            error=run.summary,
            handler=run.handler,
            error_type=type(run.error).__name__,
        )
        self._observe(event, outcome, started)
        return HandlerFailed(
            f"The operation failed ({run.summary}); nothing was kept and the key "
            f"{request.key!r} is free: retry with it.",
        )

    def _overran(self, request: KeyRequest, job: Job) -> None:
        """Record the handler that overran (called by the request thread, once)."""
        limit = round(self.claimer.watchdog.limit * 1000)
        error = TimeoutError(
            f"the handlers ran longer than IDEMHOOK_HANDLER_TIMEOUT_MS ({limit} ms); the "
            "request was answered 503 handler_timeout and its transaction rolled back"
        )
        run = HandlerRun(Status.FAILED, handler="handlers", error=error)
        failures.record(self.database.engine, [_failure(request, run)])
        event = request.event
        outcome = Outcome(event.id, Status.FAILED, error=run.summary, handler=run.handler)
        for observer in self.claimer.observers:
            observer(event, outcome, self.claimer.watchdog.limit)

    def _release_quietly(self, request: KeyRequest, owner: str) -> None:
        """After an abandoned claim failed in SQL: free the key if the lease is still ours."""
        table = processed_events
        event = request.event
        try:
            with self.database.engine.begin() as conn:
                conn.execute(
                    table.delete().where(
                        table.c.source == event.source,
                        table.c.event_id == event.id,
                        table.c.lock_owner == owner,
                    )
                )
        except DBAPIError:
            pass  # the lease expires by itself

    def _observe(self, event: Event, outcome: Outcome, started: float) -> None:
        seconds = time.perf_counter() - started
        for observer in self.claimer.observers:
            observer(event, outcome, seconds)

    def _time(self, event: Event, phase: str, started: float) -> None:
        seconds = time.perf_counter() - started
        for timer in self.claimer.timers:
            timer(event, phase, seconds)

    def _params(self, request: KeyRequest, owner: str) -> dict[str, Any]:
        event = request.event
        ts = self.statements.timestamp
        now = datetime.now(UTC)
        ttl = timedelta(seconds=request.key_ttl)
        return {
            "source": event.source,
            "event_id": event.id,
            "client": event.client,
            "event_type": event.type,
            "received_at": ts(event.received_at),
            "payload": dumps(event.payload),
            "headers": dumps(failures.safe_headers(event.headers)),
            "fingerprint": request.fingerprint,
            "expires_at": ts(now + ttl),
            "locked_until": ts(now + timedelta(seconds=self.lease_seconds)),
            "lock_owner": owner,
            "now": ts(now),
            "cutoff": ts(now - ttl),
        }


def _failure(request: KeyRequest, run: HandlerRun) -> dict[str, Any]:
    if run.error is None:  # pragma: no cover (failed and rejected runs carry their error)
        raise ValueError("a failed handler run without its error")
    return failures.failure_row(
        request.event,
        error=run.error_text,
        cause=run.error,
        raw_body=request.raw_body,
        permanent=run.status is Status.REJECTED,
    )


def _is_timeout(exc: DBAPIError) -> bool:
    # 55P03 lock_not_available (lock_timeout), 57014 query_canceled (statement_timeout).
    return getattr(exc.orig, "pgcode", None) in ("55P03", "57014")


def _lease_lost(exc: DBAPIError) -> bool:
    orig = exc.orig
    if getattr(orig, "pgcode", None) == _CHECK_VIOLATION:
        diag = getattr(orig, "diag", None)
        return getattr(diag, "constraint_name", None) == _STATUS_CHECK
    # SQLite names the constraint in the message.
    return "CHECK constraint failed" in str(orig) and _STATUS_CHECK in str(orig)


def _in_use(request: KeyRequest, why: str) -> Conflict:
    return Conflict(
        f"The {KEY_HEADER} {request.key!r} is in use: {why}. Retry after the Retry-After "
        "seconds: you will get its answer.",
        code="idempotency_key_in_use",
    )


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The database is unavailable; nothing was recorded. Retry with the same key shortly.",
        code="database_unavailable",
    )


