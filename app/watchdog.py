"""Answer a delivery whose handler overruns, without ever letting that handler's work commit.

A handler can spend as long as it likes in Python (an e-mail or CRM API that
hangs), where no database timeout reaches it. The provider, meanwhile, gives
up after 5 to 15 seconds and retries. So a delivery's claim runs on a claim
thread while the request thread watches it: when one event's handlers have run
longer than ``IDEMHOOK_HANDLER_TIMEOUT_MS``, the request thread *abandons* the
claim and answers ``503 handler_timeout``. An abandoned claim never commits:
when its handler finally returns, its transaction is rolled back (and if it
never returns, PostgreSQL ends the session after
``idle_in_transaction_session_timeout``, see :class:`app.db.Timeouts`).

Abandoning and committing exclude each other (:meth:`Job.abandon`,
:meth:`Job.may_commit`): a claim whose COMMIT has been sent is waited for,
never abandoned, so the answer always tells the truth about what committed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import ServiceUnavailable

log = logging.getLogger("idemhook.claim")

T = TypeVar("T")


class Job:
    """One delivery's claim as its request thread sees it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = False
        self.abandoned = False
        self._committing = False
        #: When the running event's handlers started (``time.monotonic``), else None.
        self.handlers_since: float | None = None
        #: The event whose handlers run now, and whether any handler has run at all.
        self.event: Any = None
        self.handlers_ran = False

    def handlers_started(self, event: Any) -> None:
        self.event = event
        self.handlers_ran = True
        self.handlers_since = time.monotonic()

    def handlers_ended(self) -> None:
        self.handlers_since = None

    def may_commit(self) -> bool:
        """Called just before COMMIT: False if the request already gave up on this claim."""
        with self._lock:
            if self.abandoned:
                return False
            self._committing = True
            return True

    def commit_done(self) -> None:
        with self._lock:
            self._committing = False

    def abandon(self) -> bool:
        """Give up on the claim unless its COMMIT is under way; True if given up."""
        with self._lock:
            if self._committing:
                return False
            self.abandoned = True
            return True


class Watchdog:
    """Runs claims on claim threads and gives up on handlers that overrun."""

    def __init__(self, limit_ms: int, threads: int) -> None:
        self.limit = limit_ms / 1000
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def run(self, work: Callable[[Job], T], on_overrun: Callable[[Job], None]) -> T:
        """Run ``work(job)`` on a claim thread; return its result, or raise on an overrun.

        ``on_overrun(job)`` is called once the claim has been abandoned (to record
        the failure); then :class:`ServiceUnavailable` ``handler_timeout`` is raised.
        """
        job = Job()
        future = self._pool().submit(_started, job, work)
        limit = self.limit
        wait = limit
        while True:
            try:
                return future.result(timeout=wait)
            except TimeoutError:
                pass
            now = time.monotonic()
            if not job.started:
                if future.cancel():
                    raise ServiceUnavailable(
                        "Every claim thread is busy with handlers that overran "
                        "IDEMHOOK_HANDLER_TIMEOUT_MS; nothing was recorded. Retry shortly.",
                        code="server_busy",
                    )
                wait = limit
                continue
            since = job.handlers_since
            if since is None:  # between handlers: SQL, bounded by the statement timeout
                wait = limit
            elif now - since < limit:
                wait = since + limit - now
            elif job.abandon():
                future.add_done_callback(_log_abandoned)
                on_overrun(job)
                raise ServiceUnavailable(
                    f"A handler ran longer than {round(limit * 1000)} ms "
                    "(IDEMHOOK_HANDLER_TIMEOUT_MS); its work was rolled back and nothing was "
                    "recorded. Retry shortly.",
                    code="handler_timeout",
                )
            else:  # its COMMIT is under way: the answer must say how that ended
                wait = limit

    def _pool(self) -> ThreadPoolExecutor:
        # Threads do not survive a fork: a child process starts its own pool.
        if self._executor is None or self._pid != os.getpid():
            with self._lock:
                if self._executor is None or self._pid != os.getpid():
                    self._executor = ThreadPoolExecutor(
                        max_workers=self.threads, thread_name_prefix="idemhook-claim"
                    )
                    self._pid = os.getpid()
        return self._executor

    def close(self) -> None:
        if self._executor is not None and self._pid == os.getpid():
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None


def _started(job: Job, work: Callable[[Job], T]) -> T:
    job.started = True
    return work(job)


def _log_abandoned(future: Future[Any]) -> None:
    # The request was answered already; say how the abandoned claim ended, for the record.
    error = future.exception()
    if error is not None:
        log.info("an abandoned claim ended with %s (rolled back)", type(error).__name__)
