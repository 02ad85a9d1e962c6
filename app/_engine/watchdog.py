"""Answer a delivery whose handler overruns, without ever letting that handler's work commit.

A handler can spend as long as it likes in Python (an e-mail or CRM API that
hangs), where no database timeout reaches it. The provider, meanwhile, gives
up after 5 to 15 seconds and retries. So a delivery's claim runs on a claim
thread while the request thread watches it: when one event's handlers have run
longer than ``IDEMHOOK_HANDLER_TIMEOUT_MS``, the request thread *abandons* the
claim and answers ``503 handler_timeout``. An abandoned claim never commits:
when its handler finally returns, its transaction is rolled back (and if it
never returns, PostgreSQL ends the session after
``idle_in_transaction_session_timeout``, see :class:`idemhook._store.database.Timeouts`).

Abandoning and committing exclude each other (:meth:`Job.abandon`,
:meth:`Job.may_commit`): a claim whose COMMIT has been sent, or that has
ended, is waited for, never abandoned, so the answer always tells the truth
about what committed.

A delivery whose every handler is registered ``database_only=True`` needs no watch: it
runs on the request thread (:func:`idemhook._engine.attempt.unwatched`), bounded by the
database's timeouts alone. Each request thread has a claim thread of its own, handed
work through two plain locks (a thread pool's futures and queues cost twice as much per
delivery, docs/performance.md). A claim thread whose claim was abandoned ends
when that claim does; its request thread gets a new one. At most ``threads``
claim threads live at once: with every one of them held by a handler that
overran and has not returned, a delivery is answered ``503 server_busy``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from enum import IntEnum
from typing import Any, Generic, TypeVar

from idemhook._values.errors import ServiceUnavailable

log = logging.getLogger("idemhook.claim")

T = TypeVar("T")


class Stage(IntEnum):
    """How far one try of an attempt has gone (what a fault then means: ``_engine.attempt``)."""

    BEFORE_HANDLERS = 0
    HANDLERS = 1
    COMMIT = 2


class Job:
    """One attempt as its watcher (the request thread, or the worker's loop) sees it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.abandoned = False
        self._past_commit = False  # COMMIT sent, or the claim has ended
        #: When the running event's handlers started (``time.monotonic``), else None.
        self.handlers_since: float | None = None
        #: The event whose handlers run now (or ran last).
        self.event: Any = None
        #: How far the current try has gone.
        self.stage = Stage.BEFORE_HANDLERS
        #: PostgreSQL: the backend of the try's transaction (ended if its handler overruns).
        self.backend: int | None = None

    @property
    def handlers_ran(self) -> bool:
        return self.stage >= Stage.HANDLERS

    def handlers_started(self, event: Any) -> None:
        self.event = event
        self.stage = Stage.HANDLERS
        self.handlers_since = time.monotonic()

    def handlers_ended(self) -> None:
        self.handlers_since = None

    def may_commit(self) -> bool:
        """Called just before COMMIT: False if the request already gave up on this claim."""
        with self._lock:
            if self.abandoned:
                return False
            self._past_commit = True
            self.stage = Stage.COMMIT
            return True

    def end(self) -> bool:
        """Called when the claim is over; True if it had been abandoned."""
        with self._lock:
            self._past_commit = True
            return self.abandoned

    def abandon(self) -> bool:
        """Give up on the claim unless its COMMIT is under way or it has ended."""
        with self._lock:
            if self._past_commit:
                return False
            self.abandoned = True
            return True


class _ClaimThread(threading.Thread, Generic[T]):
    """A request thread's partner: runs one claim at a time, handed over by two locks."""

    def __init__(self, threads: _Threads) -> None:
        super().__init__(name="idemhook-claim", daemon=True)
        self.pid = os.getpid()
        self._threads = threads
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._work: Callable[[Job], T] | None = None
        self._job: Job | None = None
        self._result: T | None = None
        self._error: BaseException | None = None

    def submit(self, work: Callable[[Job], T], job: Job) -> None:
        self._work, self._job = work, job
        self._go.release()

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the claim; True once it has ended."""
        return self._done.acquire(timeout=max(seconds, 0.0))

    def outcome(self) -> T:
        error, result = self._error, self._result
        self._error = self._result = None
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def stop(self) -> None:
        self._work = None
        self._go.release()

    def run(self) -> None:
        try:
            while True:
                self._go.acquire()
                work, job = self._work, self._job
                if work is None or job is None:
                    return
                try:
                    self._result = work(job)
                except BaseException as exc:  # noqa: BLE001 (handed to the request thread)
                    self._error = exc
                abandoned = job.end()
                # Hold nothing between claims: the work holds the app, which may be dropped.
                self._work = self._job = work = job = None
                if abandoned:
                    if self._error is not None:
                        log.info(
                            "an abandoned claim ended with %s (rolled back)",
                            type(self._error).__name__,
                        )
                    return  # its request thread has a new partner already
                self._done.release()
        finally:
            self._threads.gone(self)


class _Threads:
    """The live claim threads of one watchdog (in this process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._live: set[_ClaimThread[Any]] = set()
        self._mine = threading.local()

    def partner(self) -> _ClaimThread[Any] | None:
        """The calling thread's claim thread (started now if needed); None when at the limit."""
        found: _ClaimThread[Any] | None = getattr(self._mine, "thread", None)
        if found is not None and found.pid == os.getpid() and found.is_alive():
            return found
        with self._lock:
            if found is not None and found.pid != os.getpid():
                self._live.clear()  # inherited through a fork: those threads do not exist here
            if len(self._live) >= self.limit:
                return None
            thread: _ClaimThread[Any] = _ClaimThread(self)
            self._live.add(thread)
        thread.start()
        self._mine.thread = thread
        return thread

    def forget_partner(self) -> None:
        self._mine.thread = None

    def gone(self, thread: _ClaimThread[Any]) -> None:
        with self._lock:
            self._live.discard(thread)

    def stop_all(self) -> None:
        with self._lock:
            live, self._live = list(self._live), set()
        for thread in live:
            if thread.pid == os.getpid():
                thread.stop()


class Watchdog:
    """Runs claims on claim threads and gives up on handlers that overrun."""

    def __init__(self, limit_ms: int, threads: int) -> None:
        self.limit = limit_ms / 1000
        self._threads = _Threads(threads)
        # A dropped app (tests build hundreds) lets its idle claim threads end.
        weakref.finalize(self, self._threads.stop_all)

    def run(self, work: Callable[[Job], T], on_overrun: Callable[[Job], None]) -> T:
        """Run ``work(job)`` on a claim thread; return its result, or raise on an overrun.

        ``on_overrun(job)`` is called once the claim has been abandoned (to record
        the failure); then :class:`ServiceUnavailable` ``handler_timeout`` is raised.
        """
        thread = self._threads.partner()
        if thread is None:
            raise ServiceUnavailable(
                "Every claim thread is held by a handler that overran "
                "IDEMHOOK_HANDLER_TIMEOUT_MS and has not returned; nothing was recorded. "
                "Retry shortly.",
                code="server_busy",
            )
        job = Job()
        thread.submit(work, job)
        limit = self.limit
        wait = limit
        while not thread.wait(wait):
            since = job.handlers_since
            now = time.monotonic()
            if since is None:  # not in a handler: SQL, bounded by the statement timeout
                wait = limit
            elif now - since < limit:
                wait = since + limit - now
            elif job.abandon():
                self._threads.forget_partner()
                on_overrun(job)
                raise ServiceUnavailable(
                    f"A handler ran longer than {round(limit * 1000)} ms "
                    "(IDEMHOOK_HANDLER_TIMEOUT_MS); its work was rolled back and nothing was "
                    "recorded. Retry shortly.",
                    code="handler_timeout",
                )
            else:  # its COMMIT is under way, or it just ended: the answer must say how
                wait = limit
        return thread.outcome()
