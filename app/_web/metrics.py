"""``GET /metrics`` in Prometheus format (prometheus-client).

- ``idemhook_events_total{source,type,outcome}``: events by outcome (processed,
  duplicate, ignored, failed, rejected, ...). Event types come from senders, so
  each process labels at most ``MAX_TYPES_PER_SOURCE`` distinct types per source
  and counts the rest as ``type="other"``.
- ``idemhook_request_duration_seconds{endpoint,status}``: every HTTP request.
- ``idemhook_secret_matches_total{source,secret}``: deliveries each secret verified: a
  static secret's position in the source's ``secret`` list (``1``, ``2``...) or a tenant
  secret's id (``id:<id>``), never its value; retire an old secret once it stops moving.
  Added by the tally's flush (:class:`idemhook._engine.tenants.Matches`), about a second
  after the deliveries, so that the request pays a deque append and no more.
- ``idemhook_handler_duration_seconds{source}``: time in handlers per event.
- ``idemhook_claim_wait_seconds{source}``: time of the claim ``INSERT``, which
  includes waiting for a concurrent delivery of the same event to finish.
- ``idemhook_events_queued{source}`` and
  ``idemhook_events_oldest_queued_age_seconds{source}``: asynchronous sources'
  events received and not processed yet, read at each scrape
  (:class:`QueueCollector`); ``idemhook_events_processing_delay_seconds{source}``:
  receipt to processed, observed by ``idemhook worker``, which also counts its
  attempts in ``idemhook_events_total`` (outcomes processed, ignored, rejected,
  retry, failed) and their handler time.
- ``idemhook_outbox_messages{status}`` (pending, dead) and
  ``idemhook_outbox_oldest_pending_age_seconds``: read from ``outbox_messages``
  at each scrape (:class:`OutboxCollector`), whichever process serves it.
- ``idemhook_reconcile_runs_total{source,outcome}``,
  ``idemhook_reconciled_events_total{source}`` and
  ``idemhook_reconcile_last_success_timestamp_seconds{source}``: read from
  ``reconcile_runs`` at each scrape (:class:`ReconcileCollector`, docs/reconcile.md).
- ``idemhook_rejected_deliveries_total{source,code}``: deliveries refused before the
  claim (401, 403, 400, 404 tenant, 413, 415), by source and error code, counted by the
  process that refused them (:mod:`idemhook._engine.refusals`; ``rejected_deliveries``
  holds the rows).
- ``idemhook_source_paused{source}``: 1 while a source is paused (``idemhook sources
  pause``), else 0; read from ``source_pauses`` at each scrape (:class:`PauseCollector`).
- ``idemhook_outbox_deliveries_total{kind,outcome}`` (sent, retry, dead,
  lease_lost) and ``idemhook_outbox_send_duration_seconds{kind}``: counted by
  each ``idemhook worker`` (:class:`OutboxMetrics`), served on its
  ``--metrics-bind`` address, and by ``/metrics`` too in multiprocess mode.

gunicorn runs several worker processes, each with its own counters. Set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before starting gunicorn and
every worker writes its samples there; ``/metrics`` then aggregates all workers
(prometheus-client's multiprocess mode). Without it, each scrape sees only the
worker that answered.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from idemhook._contract import (
    Event,
)
from idemhook._engine.accept import Acceptor
from idemhook._engine.claim import Claimer, Outcome
from idemhook._engine.refusals import Refusal, Refusals
from idemhook._engine.tenants import Matches
from idemhook._store.engine import aware
from idemhook._store.models import event_queue, outbox_messages, reconcile_runs, source_pauses
from idemhook._values.outbox_status import MessageStatus
from idemhook._web.admin import require_admin_token

MAX_TYPES_PER_SOURCE = 100
OTHER_TYPE = "other"

# Webhook work is milliseconds; providers give up after 5-30 s.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# An asynchronous event waits milliseconds for the worker, or a backoff of up to an hour.
_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

bp = Blueprint("metrics", __name__)


class Metrics:
    """The metrics of one app, in their own registry (so test apps never collide)."""

    def __init__(self, max_types_per_source: int = MAX_TYPES_PER_SOURCE) -> None:
        self.registry = CollectorRegistry()
        #: Collectors read at scrape time (added to the multiprocess registry too).
        self.collectors: list[Any] = []
        self.max_types = max_types_per_source
        self._types: dict[str, set[str]] = {}
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        #: Each labelled child's ``observe`` or ``inc`` as :func:`observer` and
        #: :func:`incrementer` make them, for the paths every request takes.
        self._adders: dict[tuple[Any, tuple[str, ...]], Callable[[float], None]] = {}
        self.events = Counter(
            "idemhook_events",
            "Events received, by source, type and outcome.",
            ["source", "type", "outcome"],
            registry=self.registry,
        )
        self.requests = Histogram(
            "idemhook_request_duration_seconds",
            "HTTP request latency, by endpoint and status code.",
            ["endpoint", "status"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.handlers = Histogram(
            "idemhook_handler_duration_seconds",
            "Time spent in an event's handlers, by source.",
            ["source"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.claim_wait = Histogram(
            "idemhook_claim_wait_seconds",
            "Time of the claim INSERT (includes waiting on a concurrent duplicate), by source.",
            ["source"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.delay = Histogram(
            "idemhook_events_processing_delay_seconds",
            "Asynchronous sources: time from an event's receipt to the commit of its "
            "handlers' work by idemhook worker, by source.",
            ["source"],
            buckets=_DELAY_BUCKETS,
            registry=self.registry,
        )
        self.secret_matches = Counter(
            "idemhook_secret_matches",
            "Deliveries each secret verified, by source and secret: a static secret's "
            "position in the source's list (1, 2, ...), or a tenant secret's id (id:<id>).",
            ["source", "secret"],
            registry=self.registry,
        )

        self.rejected = Counter(
            "idemhook_rejected_deliveries",
            "Deliveries refused before the claim, by source and error code.",
            ["source", "code"],
            registry=self.registry,
        )

    def observe_refusal(self, refusal: Refusal) -> None:
        self._child(self.rejected, refusal.source, refusal.code).inc()

    def type_label(self, source: str, event_type: str | None) -> str:
        """``event_type`` itself while this source has few distinct types, else "other"."""
        if event_type is None:
            return ""
        seen = self._types.setdefault(source, set())
        if event_type in seen:
            return event_type
        if len(seen) >= self.max_types:
            return OTHER_TYPE
        seen.add(event_type)
        return event_type

    def _child(self, metric: Any, *labels: str) -> Any:
        return _labelled(self._children, metric, *labels)

    def _adder(self, metric: Any, *labels: str) -> Callable[[float], None]:
        """The labelled child's ``observe`` (a histogram) or ``inc`` (a counter), quicker."""
        key = (metric, labels)
        add = self._adders.get(key)
        if add is None:
            child = self._child(metric, *labels)
            add = observer(child) if isinstance(metric, Histogram) else incrementer(child)
            self._adders[key] = add
        return add

    def observe_event(self, event: Event, outcome: Outcome, seconds: float) -> None:
        """Count one event (a :class:`idemhook._engine.claim.Claimer` observer)."""
        type_ = self.type_label(event.source, event.type)
        self._adder(self.events, event.source, type_, outcome.status)(1)

    def observe_phase(self, event: Event, phase: str, seconds: float) -> None:
        """Record the claim or handler time of one event (a Claimer timer)."""
        histogram = self.claim_wait if phase == "claim" else self.handlers
        self._adder(histogram, event.source)(seconds)

    def observe_applied(self, event: Event, outcome: str, seconds: float | None) -> None:
        """Count one attempt of ``idemhook worker`` at an asynchronous event (``seconds``:
        its handlers' time; None when no handler matched)."""
        type_ = self.type_label(event.source, event.type)
        self._adder(self.events, event.source, type_, outcome)(1)
        if seconds is not None:
            self._adder(self.handlers, event.source)(seconds)

    def observe_delay(self, source: str, seconds: float) -> None:
        """Record the receipt-to-processed time of one asynchronous event."""
        self._adder(self.delay, source)(seconds)

    def observe_secret_match(self, source: str, secret: str, count: int) -> None:
        """Count ``count`` deliveries verified by ``secret`` (a position or ``id:<id>``, never
        a value); called by the tally's flush thread about once a second, off the request."""
        self._child(self.secret_matches, source, secret).inc(count)

    def observe_request(self, endpoint: str, status: str, seconds: float) -> None:
        """Record one HTTP request (``status``: the three digits of its status line)."""
        self._adder(self.requests, endpoint, status)(seconds)

    def attach(self, claimer: Claimer) -> None:
        claimer.observers.append(self.observe_event)
        claimer.timers.append(self.observe_phase)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            for collector in self.collectors:
                registry.register(collector)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def add_collector(self, collector: Any) -> None:
        """A collector that reads its values at scrape time (in multiprocess mode too)."""
        self.collectors.append(collector)
        self.registry.register(collector)


class OutboxCollector:
    """``outbox_messages`` at scrape time: messages by status, age of the oldest pending.

    Pending and dead messages are counted (the partial index keeps pending cheap; dead
    ones are few unless something is wrong). Sent ones are not: their number only
    grows until pruned; ``idemhook_outbox_deliveries_total`` counts them as they go.
    A database that does not answer leaves the gauges out of that scrape.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []  # values come from the database at collect time

    def collect(self) -> Any:
        table = outbox_messages
        try:
            with self.engine.begin() as conn:
                counts = dict(
                    conn.execute(
                        select(table.c.status, func.count())
                        .where(table.c.status.in_([MessageStatus.PENDING, MessageStatus.DEAD]))
                        .group_by(table.c.status)
                    ).all()
                )
                oldest = conn.execute(
                    select(func.min(table.c.created_at)).where(
                        table.c.status == str(MessageStatus.PENDING)
                    )
                ).scalar()
                now = conn.execute(select(func.now())).scalar()
        except SQLAlchemyError:
            return
        messages = GaugeMetricFamily(
            "idemhook_outbox_messages",
            "Outbox messages not sent yet (pending) or given up (dead), by status.",
            labels=["status"],
        )
        for status in (MessageStatus.PENDING, MessageStatus.DEAD):
            messages.add_metric([str(status)], counts.get(str(status), 0))
        yield messages
        age = 0.0
        if oldest is not None and now is not None:
            age = max(0.0, (aware(now) - aware(oldest)).total_seconds())
        yield GaugeMetricFamily(
            "idemhook_outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox message not sent yet (0 when none is pending).",
            value=age,
        )


class QueueCollector:
    """Asynchronous sources' waiting events at scrape time, per source.

    ``idemhook_events_queued{source}``: events received and not processed yet
    (status ``received``: waiting for a worker, in its hands, or in a backoff);
    ``idemhook_events_oldest_queued_age_seconds{source}``: how long the oldest of
    them has waited since its receipt. Read from ``event_queue`` (only events still
    to apply); every configured asynchronous source is reported, 0 when none waits.
    """

    def __init__(self, engine: Engine, sources: list[str]) -> None:
        self.engine = engine
        self.sources = sorted(sources)

    def describe(self) -> list[Any]:
        return []  # values come from the database at collect time

    def collect(self) -> Any:
        table = event_queue
        try:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    select(table.c.source, func.count(), func.min(table.c.received_at)).group_by(
                        table.c.source
                    )
                ).all()
                now = conn.execute(select(func.now())).scalar()
        except SQLAlchemyError:
            return
        found = {source: (count, oldest) for source, count, oldest in rows}
        queued = GaugeMetricFamily(
            "idemhook_events_queued",
            "Asynchronous sources: events received and not processed yet, by source.",
            labels=["source"],
        )
        age = GaugeMetricFamily(
            "idemhook_events_oldest_queued_age_seconds",
            "Asynchronous sources: age of the oldest event not processed yet (0 when none).",
            labels=["source"],
        )
        for source in sorted(set(self.sources) | set(found)):
            count, oldest = found.get(source, (0, None))
            queued.add_metric([source], count)
            waited = 0.0
            if oldest is not None and now is not None:
                waited = max(0.0, (aware(now) - aware(oldest)).total_seconds())
            age.add_metric([source], waited)
        yield queued
        yield age


class PauseCollector:
    """``idemhook_source_paused{source}``: 1 while the source is paused, read at scrape time.

    Every configured source is reported (0 when running), and any other source a
    pause row names.
    """

    def __init__(self, engine: Engine, sources: list[str]) -> None:
        self.engine = engine
        self.sources = sorted(sources)

    def describe(self) -> list[Any]:
        return []  # values come from the database at collect time

    def collect(self) -> Any:
        try:
            with self.engine.connect() as conn:
                paused = set(conn.execute(select(source_pauses.c.source)).scalars())
        except SQLAlchemyError:
            return
        gauge = GaugeMetricFamily(
            "idemhook_source_paused",
            "1 while the source is paused (idemhook sources pause), else 0.",
            labels=["source"],
        )
        for source in sorted(set(self.sources) | paused):
            gauge.add_metric([source], 1 if source in paused else 0)
        yield gauge


class ReconcileCollector:
    """``reconcile_runs`` at scrape time (docs/reconcile.md#metrics-and-alerts).

    ``idemhook_reconcile_runs_total{source,outcome}``: finished runs by outcome
    (succeeded, refused, failed, interrupted, abandoned);
    ``idemhook_reconciled_events_total{source}``: events runs applied because the provider
    never got them through; ``idemhook_reconcile_last_success_timestamp_seconds{source}``:
    when the last successful run finished (absent until one has). Counted from the table,
    so every run counts once, whichever process (a worker, ``idemhook reconcile``) ran it
    and whichever process is scraped. Reconciled sources are reported at 0 until they run.
    """

    def __init__(self, engine: Engine, sources: list[str]) -> None:
        self.engine = engine
        self.sources = sorted(sources)

    def describe(self) -> list[Any]:
        return []  # values come from the database at collect time

    def collect(self) -> Any:
        table = reconcile_runs
        try:
            with self.engine.begin() as conn:
                runs = conn.execute(
                    select(table.c.source, table.c.outcome, func.count())
                    .where(table.c.finished_at.is_not(None))
                    .group_by(table.c.source, table.c.outcome)
                ).all()
                recovered = conn.execute(
                    select(table.c.source, func.sum(table.c.recovered)).group_by(table.c.source)
                ).all()
                success = conn.execute(
                    select(table.c.source, func.max(table.c.finished_at))
                    .where(table.c.outcome == "succeeded")
                    .group_by(table.c.source)
                ).all()
        except SQLAlchemyError:
            return
        total = CounterMetricFamily(
            "idemhook_reconcile_runs",
            "Reconcile runs, by source and outcome (succeeded, refused, failed, interrupted, "
            "abandoned).",
            labels=["source", "outcome"],
        )
        for source, outcome, count in runs:
            total.add_metric([source, outcome], count)
        yield total
        events = CounterMetricFamily(
            "idemhook_reconciled_events",
            "Events reconcile runs applied because the provider never got them through, by source.",
            labels=["source"],
        )
        found = {source: int(count or 0) for source, count in recovered}
        for source in sorted(set(self.sources) | set(found)):
            events.add_metric([source], found.get(source, 0))
        yield events
        last = GaugeMetricFamily(
            "idemhook_reconcile_last_success_timestamp_seconds",
            "When the last successful reconcile run of the source finished (Unix time).",
            labels=["source"],
        )
        for source, at in success:
            if at is not None:
                last.add_metric([source], aware(at).timestamp())
        yield last


class OutboxMetrics:
    """What one ``idemhook worker`` counts: deliveries by kind and outcome, send durations."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.deliveries = Counter(
            "idemhook_outbox_deliveries",
            "Attempts at delivering outbox messages, by kind and outcome "
            "(sent, retry, dead, lease_lost).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.send_duration = Histogram(
            "idemhook_outbox_send_duration_seconds",
            "Time a sender took per attempt, by kind.",
            ["kind"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def observe_delivery(self, kind: str, outcome: str, seconds: float) -> None:
        _labelled(self._children, self.deliveries, kind, outcome).inc()
        _labelled(self._children, self.send_duration, kind).observe(seconds)


def observer(child: Any) -> Callable[[float], None]:
    """A labelled histogram's ``observe``, in fewer steps: its bucket found by bisection
    (not a loop in Python) and its two values added.

    It reads what prometheus-client's histogram keeps (its upper bounds, bucket values and
    sum, unchanged from 0.20 to 0.26); a histogram that does not keep them so is observed
    its own way, and so is a NaN. Both ways count alike: a property test compares them
    (tests/test_observability.py), so a release that changed them would fail it.
    """
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if not (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets)
        and bounds[-1] == float("inf")
        and total is not None
    ):
        return child.observe
    adds = tuple(bucket.inc for bucket in buckets)
    add_to_sum = total.inc

    def observe(amount: float) -> None:
        if amount != amount:  # NaN: in no bucket, the library's way
            child.observe(amount)
            return
        add_to_sum(amount)
        adds[bisect_left(bounds, amount)](1)  # the first bound >= amount: its bucket

    return observe


def incrementer(child: Any) -> Callable[[float], None]:
    """A labelled counter's ``inc``, without the checks that cannot fail here (a labelled
    child, an amount of at least 0, no exemplar); read like :func:`observer`."""
    value = getattr(child, "_value", None)
    add = getattr(value, "inc", None)
    return child.inc if add is None else add


def _labelled(cache: dict[tuple[Any, tuple[str, ...]], Any], metric: Any, *labels: str) -> Any:
    # .labels() takes a lock and validates on every call; the hot path looks up a dict.
    key = (metric, labels)
    child = cache.get(key)
    if child is None:
        child = cache[key] = metric.labels(*labels)
    return child


def _metrics() -> Metrics:
    return current_app.extensions["idemhook.metrics"]


@bp.get("/metrics")
def metrics() -> Response:
    if not current_app.config["IDEMHOOK_METRICS_PUBLIC"]:
        require_admin_token()
    return Response(_metrics().exposition(), mimetype=None, content_type=CONTENT_TYPE_LATEST)


class RequestTimer:
    """WSGI middleware: every request's latency into ``idemhook_request_duration_seconds``.

    A middleware around ``app.wsgi_app`` rather than ``before_request`` and
    ``after_request`` hooks: the hooks cost a request about 60,000 instructions
    (Flask's hook dispatch, ``g`` and ``request`` through their proxies), this
    about a third of that (docs/performance.md). The clock stops when the app
    has answered, before the body is sent, as an ``after_request`` hook's would.
    The endpoint's name comes from :class:`_NotingViews`.
    """

    def __init__(self, wsgi_app: Any, metrics: Metrics) -> None:
        self.wsgi_app = wsgi_app
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()
        status: list[str] = []

        def recording_start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(line)
            return start_response(line, headers, exc_info)

        _serving.endpoint = "unmatched"  # a request that matches no route
        body = self.wsgi_app(environ, recording_start_response)
        if status:
            # The endpoint name, never the path: paths carry sender-chosen IDs.
            endpoint = _serving.endpoint
            elapsed = time.perf_counter() - started
            self.metrics.observe_request(endpoint, status[-1][:3], elapsed)
        return body


#: The endpoint of the request this thread is serving, noted for :class:`RequestTimer`.
_serving = threading.local()


def note_endpoint(endpoint: str) -> None:
    """Name the endpoint of this thread's request, for one Flask does not dispatch
    (:mod:`idemhook._web.direct`)."""
    _serving.endpoint = endpoint


class _NotingViews(dict):
    """``app.view_functions`` that notes the endpoint Flask dispatches to, for the timer.

    Flask looks the matched view up here once per request (``view_functions[endpoint]``);
    noting the name then costs a dictionary lookup, where ``before_request`` hooks or a
    URL value preprocessor cost several times that (docs/performance.md). Views
    registered at any time are covered.
    """

    def __getitem__(self, endpoint: str) -> Any:
        _serving.endpoint = endpoint
        return dict.__getitem__(self, endpoint)


def init_app(
    app: Flask,
    claimer: Claimer,
    acceptor: Acceptor | None = None,
    queued: list[str] = (),
    reconciled: list[str] = (),
    matches: Matches | None = None,
    refusals: Refusals | None = None,
    sources: list[str] = (),
) -> Metrics:
    """``queued``: the asynchronous sources (their waiting events are reported);
    ``reconciled``: the reconciled sources (their runs are reported); ``sources``: every
    webhook source (paused or not)."""
    metrics_ = Metrics()
    metrics_.attach(claimer)
    if acceptor is not None:
        acceptor.observers.append(metrics_.observe_event)
    if matches is not None:
        matches.observers.append(metrics_.observe_secret_match)
    if refusals is not None:
        refusals.observers.append(metrics_.observe_refusal)
    metrics_.add_collector(PauseCollector(claimer.database.engine, list(sources)))
    metrics_.add_collector(OutboxCollector(claimer.database.engine))
    metrics_.add_collector(QueueCollector(claimer.database.engine, list(queued)))
    metrics_.add_collector(ReconcileCollector(claimer.database.engine, list(reconciled)))
    app.extensions["idemhook.metrics"] = metrics_
    app.view_functions = _NotingViews(app.view_functions)
    app.wsgi_app = RequestTimer(app.wsgi_app, metrics_)  # type: ignore[method-assign]
    app.register_blueprint(bp)
    return metrics_
