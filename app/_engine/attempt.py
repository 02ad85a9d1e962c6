"""One attempt at a piece of work in its database transaction, and what each fault means.

Every kind of work that runs handlers in a transaction runs it through :func:`run`:
the synchronous claim (:mod:`idemhook._engine.claim`), an ``Idempotency-Key``
operation (:mod:`idemhook._engine.keys`) and the worker's received events
(:mod:`idemhook._engine.applier`); the asynchronous acknowledgement
(:mod:`idemhook._engine.accept`) and the outbox's records (:mod:`idemhook._engine.sender`),
which run no handler, go through the same loop. It is the one place that decides what a
fault means; the kinds of work only say how to carry the decision out
(:class:`Attempt`).

An attempt moves through three stages (:class:`Stage`, kept on its
:class:`~idemhook._engine.watchdog.Job`): before any handler started, handlers started, COMMIT sent.
What a database error means depends on the stage alone (:func:`decide`, a pure function):

============================  ==================  ==========================================
fault                         stage               decision
============================  ==================  ==========================================
connection lost               before handlers     try again on a fresh connection, once
                                                  (a kept connection that did not survive a
                                                  restart); lost again: unavailable
connection lost               handlers, COMMIT    never run the handlers again here: resolve
                                                  from what committed, by statements fenced
                                                  by the attempt's own token
lock or statement timeout     before COMMIT       another transaction holds the row: in
                                                  progress (503, retry shortly)
any error                     COMMIT              refused: nothing of the transaction was
                                                  kept; every piece of work in it failed
any other error               before COMMIT       raised (a bug of ours, not a fault)
============================  ==================  ==========================================

A handler's own errors never reach here: :func:`idemhook._engine.dispatch.run_handlers` turns them
into a failed run of that event (a lost connection inside a handler is re-raised, so it
is decided here like any other).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Protocol, TypeVar

from sqlalchemy.exc import DBAPIError

from idemhook._engine.dispatch import HandlerRun
from idemhook._engine.watchdog import Job, Stage, Watchdog
from idemhook._store.engine import (
    is_disconnect,
    is_timeout,
)
from idemhook._values.outcome import Status

__all__ = [
    "Attempt",
    "Decision",
    "Fault",
    "Stage",
    "decide",
    "classify",
    "run",
    "overrun",
    "unwatched",
    "watched",
]

T = TypeVar("T")

#: Tries of an attempt whose connection was lost before any handler started.
MAX_TRIES = 2


class Fault(StrEnum):
    """What kind of database error ended a try."""

    #: The connection is gone (a restart, a failover, a cut network, a killed backend).
    LOST = "lost"
    #: PostgreSQL gave up waiting: ``lock_timeout`` or ``statement_timeout``.
    TIMEOUT = "timeout"
    #: Anything else PostgreSQL refused (a constraint, a serialization failure).
    ERROR = "error"


class Decision(StrEnum):
    """What to do about a try that ended in a fault."""

    RETRY = "retry"
    UNAVAILABLE = "unavailable"
    RESOLVE = "resolve"
    IN_PROGRESS = "in_progress"
    REFUSED = "refused"
    RAISE = "raise"


def classify(exc: DBAPIError) -> Fault:
    """The fault ``exc`` stands for."""
    if is_disconnect(exc):
        return Fault.LOST
    if is_timeout(exc):
        return Fault.TIMEOUT
    return Fault.ERROR


def decide(fault: Fault, stage: Stage, tries: int) -> Decision:
    """The decision for ``fault`` met at ``stage`` on try number ``tries`` (see the table)."""
    if fault is Fault.LOST:
        if stage is Stage.BEFORE_HANDLERS:
            return Decision.RETRY if tries < MAX_TRIES else Decision.UNAVAILABLE
        return Decision.RESOLVE
    if stage is Stage.COMMIT:
        return Decision.REFUSED
    if fault is Fault.TIMEOUT:
        return Decision.IN_PROGRESS
    return Decision.RAISE


class Attempt(Protocol[T]):
    """How one kind of work carries out the decisions (the bracket decides them)."""

    def once(self, job: Job) -> T:
        """One try, in a transaction of its own; raises the ``DBAPIError`` that ended it."""
        ...

    def resolve(self, lost: DBAPIError) -> T:
        """The connection was lost after a handler started: answer from what committed.

        Only statements fenced by the attempt's own token may change anything here:
        another transaction (this attempt's own COMMIT, still running on the server)
        may be committing the rows.
        """
        ...

    def refused(self, error: DBAPIError) -> T:
        """The COMMIT (or a statement sent with it) was refused: nothing was kept."""
        ...

    def in_progress(self, error: DBAPIError) -> Exception:
        """The error to raise when another transaction holds what this one waited for."""
        ...

    def unavailable(self, error: DBAPIError) -> Exception:
        """The error to raise when the database cannot be reached."""
        ...

    def abandoned(self) -> T:
        """The request gave up on this attempt (a handler overran); nothing was kept."""
        ...


def run(attempt: Attempt[T], job: Job) -> T:
    """Run ``attempt`` until it is done or a decision ends it (the one fault bracket)."""
    tries = 0
    while True:
        tries += 1
        job.stage = Stage.BEFORE_HANDLERS
        try:
            return attempt.once(job)
        except DBAPIError as exc:
            if job.abandoned:
                return attempt.abandoned()
            decision = decide(classify(exc), job.stage, tries)
            if decision is Decision.RETRY:
                continue
            if decision is Decision.RESOLVE:
                return attempt.resolve(exc)
            if decision is Decision.REFUSED:
                return attempt.refused(exc)
            if decision is Decision.IN_PROGRESS:
                raise attempt.in_progress(exc) from exc
            if decision is Decision.UNAVAILABLE:
                raise attempt.unavailable(exc) from exc
            raise


def retrying(
    work: Callable[[bool], T],
    unavailable: Callable[[DBAPIError], Exception],
    in_progress: Callable[[DBAPIError], Exception] | None = None,
) -> T:
    """Run ``work`` (idempotent, no handlers), once more on a fresh connection if it was lost.

    ``work(again)`` is told whether it runs again (its first try may have landed).
    """
    for tries in range(1, MAX_TRIES + 1):
        try:
            return work(tries > 1)
        except DBAPIError as exc:
            decision = decide(classify(exc), Stage.BEFORE_HANDLERS, tries)
            if decision is Decision.RETRY:
                continue
            if decision is Decision.UNAVAILABLE:
                raise unavailable(exc) from exc
            if decision is Decision.IN_PROGRESS and in_progress is not None:
                raise in_progress(exc) from exc
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def overrun(watchdog: Watchdog, setting: str, consequence: str) -> HandlerRun:
    """The failed run of handlers that ran past ``watchdog``'s limit (``setting``)."""
    limit = round(watchdog.limit * 1000)
    error = TimeoutError(f"the handlers ran longer than {setting} ({limit} ms); {consequence}")
    return HandlerRun(Status.FAILED, handler="handlers", error=error)


def watched(watchdog: Watchdog, attempt: Attempt[T], on_overrun: Callable[[Job], None]) -> T:
    """Run ``attempt`` on a claim thread watched by ``watchdog`` (the request's deadline)."""
    return watchdog.run(lambda job: run(attempt, job), on_overrun=on_overrun)


def unwatched(attempt: Attempt[T]) -> T:
    """Run ``attempt`` on the calling thread: for a delivery whose handlers all do nothing
    but database work (``database_only=True``), each statement bounded by the statement
    and lock timeouts, so no watch is needed and no hand-off is paid."""
    return run(attempt, Job())
