"""The claim of an ``idempotency-key`` request: lease the key, run the operation, store its answer.

A client's retry must get the first request's answer, and a retry that arrives while
the first request still runs must hear ``409`` at once, without waiting on it. So,
unlike a webhook's claim (one transaction, :mod:`idemhook._engine.claim`), a key is claimed in
two transactions, on one lane (:mod:`idemhook._store.lanes`):

1. **lease** (short, committed at once, ``synchronous_commit`` off): the key's row is
   inserted as ``in_flight`` with ``locked_until`` (the lease) and ``lock_owner`` (this
   request), or taken over when its ``key_ttl`` has passed (an expired key is a new
   request) or its lease has (the request that held it crashed). A key that is done
   and unexpired has its replay counted instead; anything else is left alone. The
   row is then read in the second transaction, which the same message opens: no
   extra round trip.
2. **operation**: ours, the handlers run (:func:`idemhook._engine.dispatch.run_handlers`) and their
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

from idemhook._config.schemes.idempotency_key import KEY_HEADER
from idemhook._contract import (
    Event,
    Response,
)
from idemhook._engine import failures
from idemhook._engine.attempt import overrun, watched
from idemhook._engine.claim import Claimer
from idemhook._engine.dispatch import HandlerRun, run_handlers
from idemhook._engine.watchdog import Job
from idemhook._store.engine import (
    is_disconnect,
)
from idemhook._store.keys import (
    KeyRow,
    KeyStatements,
)
from idemhook._store.lanes import Lane
from idemhook._values.errors import (
    Conflict,
    HandlerFailed,
    ServiceUnavailable,
    UnprocessableContent,
)
from idemhook._values.jsontext import (
    dumps,
    loads,
)
from idemhook._values.outcome import Outcome, Status

#: The status a handler's ``Reject`` is answered with (and replayed): the request can never
#: succeed as it is.
REJECTED_STATUS = 422
#: SQLSTATE of a CHECK violation, and the constraint the lease guard trips.
_CHECK_VIOLATION = "23514"
_STATUS_CHECK = "ck_processed_events_status"
#: SQLSTATE division_by_zero: the fenced finishing statement found no row of ours.
_ROW_GONE = "22012"


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
    #: The source's ``replay_errors``: a failed operation's 500 is stored and replayed.
    replay_errors: bool = False
    #: The problem ``type`` of ``handler_failed`` (worked out in the request's context).
    failed_type: str = "about:blank"


class KeyClaimer:
    """Claims keys and runs operations with the claimer's registry, watchdog and observers."""

    def __init__(self, claimer: Claimer) -> None:
        self.claimer = claimer
        self.database = claimer.database
        engine = self.database.engine
        self.statements = statements = KeyStatements(engine.dialect)
        self.database.lanes.prepared.register(
            statements.count_sql,
            statements.lease_sql,
            statements.read_sql,
            statements.finish_sql,
            statements.finish_checked_sql,
            statements.release_sql,
        )
        self._postgresql = engine.dialect.name == "postgresql"
        timeouts = self.database.timeouts
        statement_ms = timeouts.statement_ms if timeouts else 2000
        #: How long a lease holds: longer than any claim can live. Past the handler timeout
        #: the claim is abandoned and never commits; a statement (or the COMMIT) in flight
        #: then still has the statement timeout; and one more for the clocks of instances.
        self.lease_seconds = (claimer.watchdog.limit * 1000 + 2 * statement_ms) / 1000 + 1

    def apply(self, request: KeyRequest) -> Answer:
        """Claim the key and run the operation, or answer from the key (409, 422, replay)."""
        attempt = KeyOperation(self, request)
        answer = watched(self.claimer.watchdog, attempt, on_overrun=attempt.overran)
        if answer is None:  # pragma: no cover (only an abandoned claim returns None)
            raise ServiceUnavailable("The operation was abandoned; retry shortly.")
        return answer

    # -- statements ----------------------------------------------------------------------------

    def lease(self, lane: Lane, params: dict[str, Any]) -> KeyRow | None:
        """Count a replay or claim the key (committed), then read its row."""
        s = self.statements
        if self._postgresql:
            return s.key_row(lane.execute_committing(s.lease_message, params).fetchone())
        lane.execute(s.count_sql, params)
        lane.execute(s.lease_sql, params)
        lane.commit()
        lane.begin()
        return s.key_row(lane.execute(s.read_sql, params).fetchone())

    def finish(self, lane: Lane, params: dict[str, Any]) -> None:
        """Store the answer and commit, only while the key's row is still this request's.

        The finishing statement is fenced: a lease taken over makes the status CHECK
        refuse it, and a row that vanished (deleted by an operator, or freed by a
        request that gave up) refuses the COMMIT too; nothing of the operation is kept.
        """
        if self._postgresql:
            lane.commit(self.statements.finish_checked_sql, params)
            return
        if lane.execute(self.statements.finish_sql, params).rowcount != 1:
            raise KeyLost()
        lane.commit()

    def release(self, lane: Lane, row_id: int, owner: str) -> None:
        """Delete this request's claim (its transaction is over): the key is free again."""
        lane.begin()
        s = self.statements
        params = {"row_id": row_id, "lock_owner": owner}
        lane.commit(s.release_message if self._postgresql else s.release_sql, params)

    def observe(self, event: Event, outcome: Outcome, started: float) -> None:
        seconds = time.perf_counter() - started
        for observer in self.claimer.observers:
            observer(event, outcome, seconds)

    def time(self, event: Event, phase: str, started: float) -> None:
        seconds = time.perf_counter() - started
        for timer in self.claimer.timers:
            timer(event, phase, seconds)

    def params(self, request: KeyRequest, owner: str) -> dict[str, Any]:
        event = request.event
        ts = self.statements.timestamp
        params: dict[str, Any] = {
            "source": event.source,
            "event_id": event.id,
            "client": event.client,
            "event_type": event.type,
            "received_at": ts(event.received_at),
            "payload": dumps(event.payload),
            "headers": dumps(failures.safe_headers(event.headers)),
            "fingerprint": request.fingerprint,
            "lock_owner": owner,
        }
        if self.statements.server_clock:  # PostgreSQL: times from now(), seconds as numbers
            params["ttl_seconds"] = request.key_ttl
            params["lease_seconds"] = self.lease_seconds
            return params
        now = datetime.now(UTC)
        ttl = timedelta(seconds=request.key_ttl)
        params["expires_at"] = ts(now + ttl)
        params["locked_until"] = ts(now + timedelta(seconds=self.lease_seconds))
        params["now"] = ts(now)
        params["cutoff"] = ts(now - ttl)
        return params


class KeyLost(Exception):
    """SQLite: the finishing statement found the key's row gone (PostgreSQL: a refused COMMIT)."""


class KeyOperation:
    """One request's operation: an :class:`~idemhook._engine.attempt.Attempt`.

    ``owner`` is its token: the lease, the finishing statement and every release are
    fenced by it, so nothing this attempt does can touch a row another request (or
    this attempt's own COMMIT, still running on the server) is committing.
    """

    def __init__(self, keys: KeyClaimer, request: KeyRequest) -> None:
        self.keys = keys
        self.request = request
        self.owner = uuid.uuid4().hex
        self.row_id: int | None = None
        self.started = time.perf_counter()
        #: ``delivery_failures`` rows, written on the lane once the transaction has ended.
        self.failures: list[dict[str, Any]] = []

    def once(self, job: Job) -> Answer | None:
        keys, event = self.keys, self.request.event
        with keys.database.lanes.lane() as lane:
            lane.begin()
            try:
                row = keys.lease(lane, keys.params(self.request, self.owner))
                keys.time(event, "claim", self.started)
                if row is None or row.lock_owner != self.owner:
                    lane.rollback()
                    return self._answer_from(row)
                self.row_id = row.id
                return self._operate(lane, job)
            finally:
                if lane.in_transaction:
                    lane.rollback()
                lane.session.close()
                rows, self.failures = self.failures, []
                failures.write(lane, rows)

    def _operate(self, lane: Lane, job: Job) -> Answer | None:
        """Run the handlers in the open transaction and store their answer with their work."""
        keys, request = self.keys, self.request
        event = request.event
        registrations = keys.claimer.registry.for_event(event.source, event.type)
        if registrations:
            job.handlers_started(event)
            handlers_started = time.perf_counter()
            run = run_handlers(
                registrations, event, lane.session, senders=keys.claimer.registry.senders
            )
            job.handlers_ended()
            keys.time(event, "handlers", handlers_started)
        else:
            run = HandlerRun(Status.IGNORED, None, "null")
        if run.status is Status.FAILED and is_disconnect(run.error):
            raise run.error  # type: ignore[misc]  # the lost connection: the bracket decides
        if run.status is not Status.PROCESSED and run.status is not Status.IGNORED:
            # Failed or rejected: its work is undone.
            lane.session.close()
            lane.rollback()
            self.failures.append(failures.failure_of(event, run, request.raw_body))
            if run.status is Status.FAILED and not request.replay_errors:
                keys.release(lane, self._row_id, self.owner)
                raise self._failed(run)
            lane.begin()
        if run.status is Status.FAILED:  # replay_errors: the 500 is the key's answer
            problem = self._failed(run)
            body = _problem_body(problem, request.failed_type)
            answer = Answer(500, body, ((CONTENT_TYPE_HEADER, PROBLEM_JSON),))
            stored = dumps(body, strict=True)
        elif run.status is Status.REJECTED:
            # The key is kept, answered as rejected from now on.
            answer = Answer(REJECTED_STATUS, run.result)
            stored = dumps(run.result, strict=True)
        else:
            response = run.response or Response(200)
            stored = run.stored or "null"
            # Answered as every replay will be: the body as it is stored.
            answer = Answer(response.status, loads(stored), response.headers)
        params = {
            "row_id": self._row_id,
            "lock_owner": self.owner,
            "status": str(run.status),
            "result": stored,
            "response_status": answer.status,
            "response_headers": dumps([list(pair) for pair in answer.headers]),
        }
        if not keys.statements.server_clock:  # PostgreSQL: clock_timestamp() in the statement
            params["processed_at"] = keys.statements.timestamp(datetime.now(UTC))
        if not job.may_commit():  # answered handler_timeout already: keep nothing
            lane.session.close()
            lane.rollback()
            self.failures.clear()
            keys.release(lane, self._row_id, self.owner)
            return None
        try:
            keys.finish(lane, params)
        except KeyLost:
            self.failures.clear()
            raise _in_use(request, _LOST_LEASE) from None
        outcome = Outcome(event.id, run.status, answer.body, handler=run.handler)
        keys.observe(event, outcome, self.started)
        return answer

    @property
    def _row_id(self) -> int:
        if self.row_id is None:  # pragma: no cover (set once the lease is ours)
            raise RuntimeError("the key's row is not leased")
        return self.row_id

    def _answer_from(self, row: KeyRow | None) -> Answer:
        """Someone else's key: 422 for another request (first, whatever its state), 409 while
        it runs, else its stored answer, replayed."""
        request = self.request
        event = request.event
        if (
            row is not None
            and row.fingerprint is not None
            and request.fingerprint is not None
            and row.fingerprint != request.fingerprint
        ):
            raise UnprocessableContent(
                f"The {KEY_HEADER} {request.key!r} was used for a different request (another "
                "method, path, Content-Type or body); nothing was run. Use a new key for a new "
                "request.",
                code="idempotency_key_mismatch",
            )
        if row is None or row.status == Status.IN_FLIGHT:
            raise _in_use(request, "a request with it is still running")
        self.keys.observe(event, Outcome(event.id, Status.DUPLICATE, row.result), self.started)
        return Answer(
            row.response_status or 200, row.result, _headers(row.response_headers), replayed=True
        )

    def _failed(self, run: HandlerRun) -> HandlerFailed:
        """The error of a failed operation (observed here; its row is written on the lane)."""
        request = self.request
        event = request.event
        outcome = Outcome(
            event.id,
            Status.FAILED,
            error=run.summary,
            handler=run.handler,
            error_type=type(run.error).__name__,
        )
        self.keys.observe(event, outcome, self.started)
        if request.replay_errors:
            return HandlerFailed(
                f"The operation failed ({run.summary}); nothing of it was kept. This answer "
                f"is stored: a retry with the key {request.key!r} gets it again; use a new key "
                "to try again."
            )
        return HandlerFailed(
            f"The operation failed ({run.summary}); nothing was kept and the key "
            f"{request.key!r} is free: retry with it.",
        )

    # -- what the bracket decided ----------------------------------------------------------------

    def refused(self, error: DBAPIError) -> Answer | None:
        """The COMMIT was refused: nothing was kept. A lost lease is 409; else 500, key free."""
        request = self.request
        if _lease_lost(error):
            raise _in_use(request, _LOST_LEASE) from error
        commit = HandlerRun(Status.FAILED, handler="COMMIT", error=error)
        with self.keys.database.lanes.lane() as lane:
            self.keys.release(lane, self._row_id, self.owner)
            failures.write(lane, [failures.failure_of(request.event, commit, request.raw_body)])
        raise self._failed(commit) from error

    def resolve(self, lost: DBAPIError) -> Answer:
        """The connection died at or after the handlers: answer from what committed, or 503.

        The key is freed only if it is still this attempt's and still in flight (the
        release is fenced by the owner token, which the finishing statement clears): a
        release that meets this attempt's own COMMIT still running on the server waits
        for it, and then finds nothing of ours to free.
        """
        request = self.request
        event = request.event
        try:
            row = self.keys.statements.release_and_read(
                self.keys.database.engine, event.source, event.id, self._row_id, self.owner
            )
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc
        if row is None or row.status == Status.IN_FLIGHT:
            raise self.unavailable(lost) from lost
        return Answer(row.response_status or 200, row.result, _headers(row.response_headers))

    def in_progress(self, error: DBAPIError) -> Exception:
        # The key's row is locked by another transaction (an operator's `events replay`).
        return _in_use(self.request, "its row is locked by another operation")

    def unavailable(self, error: DBAPIError) -> Exception:
        return ServiceUnavailable(
            "The database is unavailable; nothing was recorded. Retry with the same key shortly.",
            code="database_unavailable",
        )

    def abandoned(self) -> Answer | None:
        """An abandoned operation failed in SQL: free the key if the lease is still ours."""
        if self.row_id is None:
            return None
        try:
            self.keys.statements.release_on(self.keys.database.reserve, self.row_id, self.owner)
        except DBAPIError:
            pass  # the lease expires by itself
        return None

    def overran(self, job: Job) -> None:
        """Record the handler that overran (called by the request thread, once)."""
        keys, request = self.keys, self.request
        run = overrun(
            keys.claimer.watchdog,
            "IDEMHOOK_HANDLER_TIMEOUT_MS",
            "the request was answered 503 handler_timeout and its transaction rolled back",
        )
        event = request.event
        failures.record(keys.database.reserve, [failures.failure_of(event, run, request.raw_body)])
        outcome = Outcome(event.id, Status.FAILED, error=run.summary, handler=run.handler)
        for observer in keys.claimer.observers:
            observer(event, outcome, keys.claimer.watchdog.limit)


_LOST_LEASE = "its lease ran out, or its record was removed, while it ran; nothing was kept"
CONTENT_TYPE_HEADER = "Content-Type"
PROBLEM_JSON = "application/problem+json"


def _problem_body(error: HandlerFailed, type_: str) -> dict[str, Any]:
    return {
        "type": type_,
        "title": "Operation failed",
        "status": error.status_code,
        "detail": error.message,
        "error": error.code,
        "message": error.message,
    }


def _headers(stored: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(name), str(value)) for name, value in stored or ())


def _lease_lost(exc: DBAPIError) -> bool:
    """The finishing statement was refused because the key's row is no longer ours."""
    orig = exc.orig
    code = getattr(orig, "pgcode", None)
    if code == _ROW_GONE:
        return True
    if code == _CHECK_VIOLATION:
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
