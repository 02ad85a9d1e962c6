"""``idemhook worker``'s loop: kinds of background work sharing one wake-up, backoff and stop.

A :class:`Work` is one kind of work the worker does: today delivering outbox
messages (:class:`idemhook._engine.sender.Delivery`); the asynchronous handling of received
events is meant to be another. The loop gives every kind what they have in
common:

- **wake-up**: one ``LISTEN`` connection for every kind's channels, so a
  ``NOTIFY`` sent by a committing transaction wakes the worker at once; a poll
  every ``IDEMHOOK_WORKER_POLL_MS`` covers notifications lost with a connection,
  sent through a transaction-mode pooler, or never sent; each kind also says
  when its next piece of work falls due (a backoff, a lease), and the loop
  wakes then;
- **backoff**: :func:`backoff` (exponential with jitter) for work that failed,
  and the same for the loop itself when the database is unreachable;
- **graceful stop**: SIGTERM (or SIGINT) lets the piece of work in hand finish,
  then each kind gives back what it took and has not started (:meth:`Work.release`).

Every statement a kind runs goes through the app's engine, so it runs under the
claim's ``SET LOCAL`` timeouts and pooler rules (:mod:`idemhook._store.database`). ``LISTEN`` is
the one piece of session state: it needs a direct or session-mode connection
(``IDEMHOOK_WORKER_LISTEN_URL``, docs/outbox.md).
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from idemhook._store.engine import (
    Timeouts,
    build_engine,
    is_disconnect,
)
from idemhook._store.notify import listen

log = logging.getLogger("idemhook.worker")

#: Longest pause of the loop after the database failed, however often it failed.
MAX_ERROR_BACKOFF = 30.0


class Work(Protocol):
    """One kind of work the worker does, in small batches."""

    #: Shown in logs ("outbox").
    name: str
    #: The NOTIFY channels that mean "work of this kind may be due".
    channels: tuple[str, ...]

    def step(self, worker: Worker) -> float | None:
        """Do one batch of due work.

        Return 0 when more may be due at once, else the seconds until this
        kind's next piece of work falls due (``None``: nothing known; the poll
        covers it). Between pieces of work, stop early when ``worker.stopping``.
        """
        ...

    def release(self) -> None:
        """Give back anything taken and not started (the worker is stopping)."""
        ...


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...).

    ``base`` doubles with each attempt up to ``cap``; the wait is drawn from
    the upper half of that ("equal jitter"), so retries of many messages that
    failed together spread out, yet none comes back much sooner than its step.
    """
    step = min(cap, base * 2 ** min(max(attempt, 1) - 1, 62))
    return step / 2 + (rng or random).uniform(0, step / 2)


def worker_name() -> str:
    """``host:pid``: who holds a piece of work (shown by ``idemhook outbox show``)."""
    return f"{socket.gethostname()[:96]}:{os.getpid()}"


class Listener:
    """A ``LISTEN`` connection of its own; reconnects when it is lost, never raises."""

    def __init__(
        self,
        url: URL,
        channels: Sequence[str],
        *,
        connect_timeout_ms: int,
        name: str = "idemhook-worker-listen",
    ) -> None:
        self.channels = tuple(dict.fromkeys(channels))
        # No pool (one connection, held for good) and no SET LOCAL: LISTEN runs outside
        # any transaction, in autocommit.
        self.engine = build_engine(
            url,
            timeouts=Timeouts(connect_timeout_ms, connect_timeout_ms, 0),
            pool_size=1,
            pool_mode="session-pooler",
            name=name,
        )
        self._raw: Any = None
        self._retry_at = 0.0
        self._failures = 0

    @property
    def connection(self) -> Any:
        return None if self._raw is None else self._raw.dbapi_connection

    def fileno(self) -> int | None:
        connection = self.connection
        return None if connection is None else connection.fileno()

    def connect(self) -> bool:
        """Listen (again) if not listening; True when a connection was just made.

        After a (re)connection the caller looks for due work: notifications sent
        while nothing listened are lost.
        """
        if self._raw is not None or time.monotonic() < self._retry_at:
            return False
        try:
            raw = self.engine.raw_connection()
            connection = raw.dbapi_connection
            connection.autocommit = True
            listen(connection, self.channels)
        except (DBAPIError, self.engine.dialect.loaded_dbapi.Error) as exc:
            self._failures += 1
            delay = backoff(self._failures, 0.5, MAX_ERROR_BACKOFF)
            self._retry_at = time.monotonic() + delay
            log.warning(
                "cannot LISTEN (%s); polling, trying again in %.1f s",
                first_line(exc),
                delay,
            )
            return False
        self._raw = raw
        self._failures = 0
        log.info("listening on %s", ", ".join(self.channels))
        return True

    def drain(self) -> bool:
        """Read what arrived; True if any notification did. A lost connection is dropped."""
        connection = self.connection
        if connection is None:
            return False
        try:
            connection.poll()
        except self.engine.dialect.loaded_dbapi.Error as exc:
            log.warning("the LISTEN connection was lost (%s); polling meanwhile", first_line(exc))
            self.close()
            return True  # look for work at once: something may have been missed
        got = bool(connection.notifies)
        connection.notifies.clear()
        return got

    def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.invalidate()  # never back to a pool: it holds a LISTEN
            except Exception:  # noqa: BLE001 (closing a dead connection)
                pass

    def dispose(self) -> None:
        self.close()
        self.engine.dispose()


class Worker:
    """Runs ``works`` until :meth:`stop`: wake, do what is due, wait, again."""

    def __init__(
        self,
        works: Sequence[Work],
        *,
        poll_seconds: float = 1.0,
        listen_url: URL | None = None,
        connect_timeout_ms: int = 2000,
        listen_name: str = "idemhook-worker-listen",
    ) -> None:
        if not works:
            raise ValueError("a worker needs at least one kind of work")
        self.works = list(works)
        self.poll_seconds = poll_seconds
        channels = [channel for work in self.works for channel in work.channels]
        self.listener = (
            Listener(listen_url, channels, connect_timeout_ms=connect_timeout_ms, name=listen_name)
            if listen_url is not None and channels
            else None
        )
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._errors = 0

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, *_args: Any) -> None:
        """Finish the piece of work in hand, then return from :meth:`run` (signal-safe)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # pragma: no cover (the pipe is full: a wake-up is pending anyway)
            pass

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        names = ", ".join(work.name for work in self.works)
        how = "LISTEN/NOTIFY and polling" if self.listener else "polling"
        log.info(
            "worker %s started (%s; %s every %.2f s)", worker_name(), names, how, self.poll_seconds
        )
        try:
            while not self.stopping:
                if self.listener is not None:
                    self.listener.connect()
                    self.listener.drain()
                wait = self._step()
                if wait > 0 and not self.stopping:
                    self._wait(wait)
        finally:
            for work in self.works:
                try:
                    work.release()
                except SQLAlchemyError as exc:
                    log.warning(
                        "%s: could not give back its work (%s); its leases will expire",
                        work.name,
                        first_line(exc),
                    )
            if self.listener is not None:
                self.listener.dispose()
            os.close(self._wake_r)
            os.close(self._wake_w)
            log.info("worker %s stopped", worker_name())

    def _step(self) -> float:
        """Give every kind one batch; the seconds to wait before the next round.

        After a database error the loop waits the pause its log line announces
        (exponential, up to :data:`MAX_ERROR_BACKOFF`), whatever the poll interval:
        the kinds share one database.
        """
        wait = self.poll_seconds
        failed = False
        for work in self.works:
            if self.stopping:
                break
            try:
                due = work.step(self)
            except SQLAlchemyError as exc:
                failed = True
                self._errors += 1
                pause = backoff(self._errors, 0.2, MAX_ERROR_BACKOFF)
                gone = is_disconnect(exc)
                log.warning(
                    "%s: %s (%s); trying again in %.1f s",
                    work.name,
                    "the database is unreachable" if gone else "a statement failed",
                    first_line(exc),
                    pause,
                )
                wait = pause
                continue
            if due is not None and not failed:
                wait = min(wait, max(due, 0.0))
        if not failed:
            self._errors = 0
        return wait

    def _wait(self, seconds: float) -> None:
        """Sleep until a notification, :meth:`stop`, or ``seconds`` pass."""
        watched = [self._wake_r]
        fileno = self.listener.fileno() if self.listener is not None else None
        if fileno is not None:
            watched.append(fileno)
        readable, _, _ = select.select(watched, [], [], seconds)
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:  # pragma: no cover
                pass


def first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]
