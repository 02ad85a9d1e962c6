"""One reconcile run: what the provider logged, what idemhook has, and the difference applied.

A run, fenced by its ``reconcile_runs`` row (:mod:`idemhook._store.reconcile_runs`):

1. ask the provider for the events of the window, a page at a time (:mod:`.stripe`,
   :mod:`.github`, or a plugin's ``@reconciler``);
2. read each event's ID exactly as the live source reads a delivery's, and look the
   page's IDs up in ``processed_events`` (one indexed query per page);
3. apply each event idemhook has no claim of **through the path a live delivery
   takes**: a synchronous source's claim (:meth:`idemhook._engine.claim.Claimer.apply`, handlers in
   the claim's transaction), an asynchronous source's acknowledgement
   (:meth:`idemhook._engine.accept.Acceptor.recover`, applied by ``idemhook worker``), marked
   ``received_via = 'reconcile'``. A live delivery of the same event at the same moment
   meets the same unique claim: one of the two applies it, the other is a duplicate;
4. record the figures and how the run ended.

Events younger than :data:`GRACE` are left to their live delivery, which is most likely
on its way. ``dry_run`` does steps 1 and 2 only: it writes nothing, not even its row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import Headers

from idemhook._config.events import event_id_of, event_of
from idemhook._config.reconcile import GITHUB, STRIPE, ReconcileConfig
from idemhook._config.sources import Source
from idemhook._contract import (
    Window,
)
from idemhook._engine.accept import Acceptor
from idemhook._engine.claim import Claimer
from idemhook._engine.reconcile.base import Found, Reconciler, Unusable
from idemhook._engine.reconcile.github import GitHubDeliveries
from idemhook._engine.reconcile.http import ProviderError
from idemhook._engine.reconcile.plugin import PluginReconciler
from idemhook._engine.reconcile.stripe import StripeEvents
from idemhook._engine.registry import (
    Registry,
)
from idemhook._store import reconcile_runs
from idemhook._store.claims import known_event_ids
from idemhook._store.reconcile_runs import Counts
from idemhook._values.errors import BadRequest, ServiceUnavailable
from idemhook._values.jsontext import (
    dumps,
)
from idemhook._values.outcome import Status

log = logging.getLogger("idemhook.reconcile")

#: Events younger than this are left to their live delivery (the run's window ends here).
GRACE = timedelta(seconds=60)
#: How long a run's claim holds without being renewed; it is renewed every third of it.
LEASE = timedelta(seconds=120)
#: Most event IDs listed in a report (``--json``); the counts are always whole.
MAX_LISTED = 10_000


class Busy(Exception):
    """Another run of the source is in progress (or this slot was run already)."""

    def __init__(self, source: str, running: dict[str, Any] | None) -> None:
        self.source = source
        self.running = running
        if running is None:
            what = f"this slot of {source!r} was reconciled already"
        else:
            what = (
                f"run {running['id']} of {source!r} is in progress (by {running['owner']}, "
                f"since {running['started_at']:%Y-%m-%d %H:%M:%S}Z)"
            )
        super().__init__(what)


class Interrupted(Exception):
    """The run stops early: its worker is stopping, or another took its fence over."""

    def __init__(self, outcome: str | None, message: str) -> None:
        super().__init__(message)
        #: How to record the run; None: it is not ours to record any more.
        self.outcome = outcome


@dataclass
class Report:
    """What a run saw and did."""

    source: str
    window: Window
    dry_run: bool = False
    run_id: int | None = None
    seen: int = 0
    already: int = 0
    #: Applied now (a dry run: would be applied).
    recovered: int = 0
    failed: int = 0
    applied: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    outcome: str = "running"
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    #: The IDs met so far (a redelivery listed again is one event).
    seen_ids: set[str] = field(default_factory=set, repr=False)

    def counts(self) -> Counts:
        return Counts(self.seen, self.already, self.recovered, self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "run": self.run_id,
            "dry_run": self.dry_run,
            "since": self.window.since.isoformat(),
            "until": self.window.until.isoformat(),
            "outcome": self.outcome,
            "error": self.error,
            "seen": self.seen,
            "already_applied": self.already,
            "applied_now" if not self.dry_run else "would_apply": self.recovered,
            "failed": self.failed,
            "applied" if not self.dry_run else "missing": self.applied,
            "failed_ids": self.failed_ids,
            "seconds": round(self.seconds, 3),
        }


def reconciler_for(
    config: ReconcileConfig, registry: Registry, wait: Callable[[float, str], None]
) -> Reconciler:
    """The reconciler of ``config``'s source: built in, or its plugin's."""
    if config.provider == STRIPE:
        return StripeEvents(config, wait)
    if config.provider == GITHUB:
        return GitHubDeliveries(config, wait)
    return PluginReconciler(registry.reconcilers[config.source])


def window_of(since: timedelta, now: datetime | None = None) -> Window:
    """The window of a run starting ``now`` that looks back ``since``."""
    now = now or datetime.now(UTC)
    return Window(since=now - since, until=now - GRACE)


class Reconciliation:
    """Runs one source's reconciler (see the module docstring)."""

    def __init__(
        self,
        *,
        engine: Engine,
        source: Source,
        config: ReconcileConfig,
        registry: Registry,
        claimer: Claimer,
        acceptor: Acceptor,
        owner: str,
        stop: threading.Event | None = None,
    ) -> None:
        self.engine = engine
        self.source = source
        self.config = config
        self.registry = registry
        self.claimer = claimer
        self.acceptor = acceptor
        self.owner = owner
        self.stop = stop or threading.Event()
        self._run_id: int | None = None
        self._renewed = 0.0
        self._report: Report | None = None

    def run(
        self,
        window: Window,
        *,
        started_by: str,
        scheduled_for: datetime | None = None,
        dry_run: bool = False,
    ) -> Report:
        """Run once over ``window``; raises :class:`Busy` when the fence says no."""
        report = self._report = Report(self.source.name, window, dry_run=dry_run)
        reconciler = reconciler_for(self.config, self.registry, self._wait)
        if not dry_run:
            run_id = reconcile_runs.begin(
                self.engine,
                source=self.source.name,
                started_by=started_by,
                window_start=window.since,
                window_end=window.until,
                owner=self.owner,
                lease=LEASE,
                scheduled_for=scheduled_for,
            )
            if run_id is None:
                reconciler.close()
                running = reconcile_runs.running(self.engine, self.source.name)
                raise Busy(self.source.name, running)
            self._run_id = report.run_id = run_id
            self._renewed = time.monotonic()
        log.info(
            "reconcile %s: run %s started (%s since %s)",
            self.source.name,
            report.run_id if report.run_id is not None else "(dry run)",
            started_by,
            window.since.isoformat(timespec="seconds"),
        )
        try:
            for page in reconciler.pages(window):
                self._alive()
                self._page(page, report)
            report.outcome = "succeeded"
        except ProviderError as exc:
            report.outcome, report.error = exc.outcome, str(exc)
        except Interrupted as exc:
            report.outcome, report.error = exc.outcome or "abandoned", str(exc)
            if exc.outcome is None:
                self._run_id = None  # taken over: nothing of ours to record
        except BaseException as exc:  # Ctrl-C, the database went away, a bug: record it if we can
            if isinstance(exc, KeyboardInterrupt):
                report.outcome, report.error = "interrupted", "stopped: interrupted (Ctrl-C)"
            else:
                report.outcome = "failed"
                report.error = f"{type(exc).__name__}: {exc}"[:2000]
            try:
                self._record(report)
            except SQLAlchemyError:
                log.warning("reconcile %s: could not record the run's end", self.source.name)
            raise
        finally:
            reconciler.close()
        self._record(report)
        return report

    # -- one page --------------------------------------------------------------------------

    def _page(self, page: list[Found], report: Report) -> None:
        source = self.source
        # The IDs the listing tells (None: only the payload, loaded below, holds it).
        ids = [event_id_of(source, f.payload or {}, Headers(f.headers)) for f in page]
        known = known_event_ids(self.engine, source.name, [i for i in ids if i is not None])
        seen = report.seen_ids
        for found, event_id in zip(page, ids, strict=True):
            self._alive()
            if event_id is not None:
                if event_id in seen:
                    continue  # a redelivery listed again: one event
                seen.add(event_id)
                report.seen += 1
                if event_id in known:
                    report.already += 1
                    continue
            payload, headers = found.payload, found.headers
            try:
                if payload is None and found.load is not None:
                    payload, headers = found.load()
                event = event_of(source, payload, Headers(headers), datetime.now(UTC))
            except (Unusable, BadRequest) as exc:
                if event_id is None:
                    report.seen += 1
                self._failed(report, event_id or "(unreadable)", str(exc))
                continue
            if event_id is None:  # its ID is in the payload: known only now
                if event.id in seen:
                    continue
                seen.add(event.id)
                report.seen += 1
                if known_event_ids(self.engine, source.name, [event.id]):
                    report.already += 1
                    continue
            if report.dry_run:
                report.recovered += 1
                _listed(report.applied, event.id)
                continue
            self._apply(event, payload, report)

    def _apply(self, event: Any, payload: Any, report: Report) -> None:
        """The live path: the claim (sync) or the acknowledgement (async)."""
        try:
            if self.source.asynchronous:
                (new,) = self.acceptor.recover(self.source, [event])
                status = Status.ACCEPTED if new else Status.DUPLICATE
                error = None
            else:
                (outcome,) = self.claimer.apply([event], dumps(payload).encode(), recovered=True)
                status, error = outcome.status, outcome.error
        except BadRequest as exc:  # an asynchronous source's order key is missing
            self._failed(report, event.id, exc.message)
            return
        except ServiceUnavailable as exc:
            if exc.code == "database_unavailable":
                raise
            self._failed(report, event.id, exc.message)  # in progress, or a handler overran
            return
        if status is Status.DUPLICATE:
            report.already += 1  # a live delivery was first
        elif status is Status.FAILED:
            self._failed(report, event.id, error or "a handler failed")
        else:
            report.recovered += 1
            _listed(report.applied, event.id)

    def _failed(self, report: Report, event_id: str, why: str) -> None:
        report.failed += 1
        _listed(report.failed_ids, event_id)
        log.warning("reconcile %s: event %s not applied: %s", self.source.name, event_id, why)

    # -- the fence -------------------------------------------------------------------------

    def _alive(self) -> None:
        """Renew the run's lease when a third of it has passed; stop when told to."""
        if self.stop.is_set():
            raise Interrupted("interrupted", "stopped: its worker was told to stop")
        if self._run_id is None or time.monotonic() - self._renewed < LEASE.total_seconds() / 3:
            return
        report = self._report
        counts = report.counts() if report is not None else Counts()
        if not reconcile_runs.renew(self.engine, self._run_id, LEASE, counts):
            raise Interrupted(None, "its lease ran out and another run took the source over")
        self._renewed = time.monotonic()

    def _wait(self, seconds: float, why: str) -> None:
        """Wait for the provider (a rate limit, a backoff), renewing the lease meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            self._alive()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, LEASE.total_seconds() / 6))

    def _record(self, report: Report) -> None:
        report.seconds = time.monotonic() - report.started
        if self._run_id is not None:
            if not reconcile_runs.finish(
                self.engine, self._run_id, report.outcome, report.counts(), report.error
            ):
                report.error = report.error or "taken over while it ran"
        level = logging.INFO if report.outcome == "succeeded" else logging.WARNING
        log.log(
            level,
            "reconcile %s: run %s %s: saw %d, already applied %d, %s %d, failed %d%s",
            report.source,
            report.run_id if report.run_id is not None else "(dry run)",
            report.outcome,
            report.seen,
            report.already,
            "would apply" if report.dry_run else "applied now",
            report.recovered,
            report.failed,
            f" ({report.error})" if report.error else "",
        )


def _listed(ids: list[str], event_id: str) -> None:
    if len(ids) < MAX_LISTED:
        ids.append(event_id)
