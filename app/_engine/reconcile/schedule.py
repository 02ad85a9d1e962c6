"""``idemhook worker`` runs each source's reconcile every ``every`` (docs/reconcile.md).

Time is cut into slots of ``every`` (from the epoch, in UTC): 15m gives :00, :15, :30
and :45. In each slot one run of the source is due; every worker tries to begin it and
the fence (:mod:`idemhook._store.reconcile_runs`: one row per source and slot, one unfinished
run per source) lets exactly one of them. A worker that starts after a slot began runs
it then, if no other did; a slot missed altogether (no worker was up) is simply covered
by the next one's lookback.

A run calls the provider and may wait out its rate limits: it runs on a thread of its
own, so the worker's other work (outbox messages, received events, among them the ones
the run recovers) goes on meanwhile. One run at a time per worker process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from idemhook._config.reconcile import ReconcileConfig
from idemhook._config.sources import Source
from idemhook._engine.accept import Acceptor
from idemhook._engine.claim import Claimer
from idemhook._engine.reconcile.http import ProviderError
from idemhook._engine.reconcile.run import Busy, Reconciliation, window_of
from idemhook._engine.registry import Registry
from idemhook._store import reconcile_runs
from idemhook._values.errors import ServiceUnavailable

log = logging.getLogger("idemhook.reconcile")

#: After a slot's run could not begin because another run of the source was unfinished.
BUSY_RETRY = 5.0
#: How long a stopping worker waits for its run to give up (its HTTP call may be in flight).
STOP_WAIT = 45.0

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def slot_of(now: datetime, every: timedelta) -> datetime:
    """The start of the slot of ``every`` that ``now`` is in."""
    step = every.total_seconds()
    return EPOCH + timedelta(seconds=(now - EPOCH).total_seconds() // step * step)


class Scheduled:
    """The worker's kind of work "reconcile" (:class:`idemhook._engine.worker.Work`)."""

    name = "reconcile"
    channels: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        engine: Engine,
        sources: Mapping[str, Source],
        configs: Mapping[str, ReconcileConfig],
        registry: Registry,
        claimer: Claimer,
        acceptor: Acceptor,
        owner: str,
    ) -> None:
        self.engine = engine
        self.sources = sources
        self.configs = {name: c for name, c in sorted(configs.items()) if c.every is not None}
        self.registry = registry
        self.claimer = claimer
        self.acceptor = acceptor
        self.owner = owner
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: The last slot of each source that this worker knows to be run (by anyone).
        self._done: dict[str, datetime] = {}
        #: When to try a source's slot again after it found another run unfinished.
        self._retry_at: dict[str, float] = {}

    def step(self, worker: Any) -> float | None:
        """Begin the run of the first source whose slot is due; seconds until the next one."""
        now = datetime.now(UTC)
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
        waits = []
        for name, config in self.configs.items():
            every = config.every
            assert every is not None
            slot = slot_of(now, every)
            due = self._done.get(name) != slot and time.monotonic() >= self._retry_at.get(name, 0)
            if due and not running and not worker.stopping:
                self._start(name, config, slot, now)
                running = True
            waits.append((slot + every - now).total_seconds())
        return max(0.0, min(waits)) if waits else None

    def _start(self, name: str, config: ReconcileConfig, slot: datetime, now: datetime) -> None:
        thread = threading.Thread(
            target=self._run,
            args=(name, config, slot, now),
            name=f"idemhook-reconcile-{name}",
            daemon=True,
        )
        with self._lock:
            self._thread = thread
        thread.start()

    def _run(self, name: str, config: ReconcileConfig, slot: datetime, now: datetime) -> None:
        reconciliation = Reconciliation(
            engine=self.engine,
            source=self.sources[name],
            config=config,
            registry=self.registry,
            claimer=self.claimer,
            acceptor=self.acceptor,
            owner=self.owner,
            stop=self._stop,
        )
        try:
            reconciliation.run(
                window_of(config.lookback, now), started_by="worker", scheduled_for=slot
            )
        except Busy:
            try:
                taken = reconcile_runs.slot_taken(self.engine, name, slot)
            except SQLAlchemyError:
                taken = False
            if not taken:  # another run of the source is unfinished: try this slot again soon
                self._retry_at[name] = time.monotonic() + BUSY_RETRY
                return
        except (SQLAlchemyError, ServiceUnavailable, ProviderError) as exc:
            log.warning("reconcile %s: the run ended early: %s", name, type(exc).__name__)
            self._retry_at[name] = time.monotonic() + BUSY_RETRY
            return
        except Exception:  # a bug: say it, keep the worker's other work going
            log.exception("reconcile %s: the run failed", name)
        self._done[name] = slot

    def release(self) -> None:
        """Stop the run in hand (recorded as interrupted) and wait for it to end."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(STOP_WAIT)
            if thread.is_alive():
                log.warning("reconcile: the run did not stop in time; its lease will run out")
