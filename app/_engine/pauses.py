"""Paused sources as each process sees them: a set read from ``source_pauses`` at most once
a second.

A delivery asks :meth:`Pauses.paused` whether its source is paused: a clock check and
a set lookup. The first delivery after the set is a second old reads it again (one
statement, by one thread; the others go on with the set they have), so a pause or a
resume reaches every process of every instance within about a second of its commit,
and a source that is not paused pays no statement of its own per delivery
(docs/operations.md, "Pausing a source"). If the read fails the last set is kept and
the next delivery tries again a second later.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from idemhook._store.database import Database
from idemhook._store.refusals import paused_sources

log = logging.getLogger("idemhook.pauses")

#: The longest a process goes on with the set it read (seconds).
REFRESH_SECONDS = 1.0


class Pauses:
    """The paused sources, cached per process (see the module docstring)."""

    def __init__(self, database: Database, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.database = database
        self.refresh_seconds = refresh_seconds
        self._paused: frozenset[str] = frozenset()
        self._read_at = -float("inf")
        self._reading = threading.Lock()

    def paused(self, source: str) -> bool:
        if time.monotonic() - self._read_at >= self.refresh_seconds:
            self._refresh()
        return source in self._paused

    def _refresh(self) -> None:
        if not self._reading.acquire(blocking=False):
            return  # another thread is reading it: go on with the last set
        try:
            started = time.monotonic()
            if started - self._read_at < self.refresh_seconds:
                return
            try:
                self._paused = paused_sources(self.database.lanes, self.database.engine)
            except SQLAlchemyError as exc:
                log.warning(
                    "could not read the paused sources (%s); keeping the last known",
                    type(exc).__name__,
                )
            # The time the read began: what was committed before it is in the set.
            self._read_at = started
        finally:
            self._reading.release()

    @property
    def known(self) -> frozenset[str]:
        """The set as last read (for metrics)."""
        return self._paused
