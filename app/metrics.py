"""``GET /metrics`` in Prometheus format (prometheus-client).

- ``idemhook_events_total{source,type,outcome}``: events by outcome (processed,
  duplicate, ignored, failed, rejected, ...). Event types come from senders, so
  each process labels at most ``MAX_TYPES_PER_SOURCE`` distinct types per source
  and counts the rest as ``type="other"``.
- ``idemhook_request_duration_seconds{endpoint,status}``: every HTTP request.
- ``idemhook_handler_duration_seconds{source}``: time in handlers per event.
- ``idemhook_claim_wait_seconds{source}``: time of the claim ``INSERT``, which
  includes waiting for a concurrent delivery of the same event to finish.

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
from typing import Any

from flask import Blueprint, Flask, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .admin import require_admin_token
from .claim import Claimer, Outcome
from .plugins import Event

MAX_TYPES_PER_SOURCE = 100
OTHER_TYPE = "other"

# Webhook work is milliseconds; providers give up after 5-30 s.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

bp = Blueprint("metrics", __name__)


class Metrics:
    """The metrics of one app, in their own registry (so test apps never collide)."""

    def __init__(self, max_types_per_source: int = MAX_TYPES_PER_SOURCE) -> None:
        self.registry = CollectorRegistry()
        self.max_types = max_types_per_source
        self._types: dict[str, set[str]] = {}
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
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
        # .labels() takes a lock and validates on every call; the hot path looks up a dict.
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_event(self, event: Event, outcome: Outcome, seconds: float) -> None:
        """Count one event (a :class:`app.claim.Claimer` observer)."""
        type_ = self.type_label(event.source, event.type)
        self._child(self.events, event.source, type_, outcome.status).inc()

    def observe_phase(self, event: Event, phase: str, seconds: float) -> None:
        """Record the claim or handler time of one event (a Claimer timer)."""
        histogram = self.claim_wait if phase == "claim" else self.handlers
        self._child(histogram, event.source).observe(seconds)

    def observe_request(self, endpoint: str, status: str, seconds: float) -> None:
        """Record one HTTP request (``status``: the three digits of its status line)."""
        self._child(self.requests, endpoint, status).observe(seconds)

    def attach(self, claimer: Claimer) -> None:
        claimer.observers.append(self.observe_event)
        claimer.timers.append(self.observe_phase)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


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


def init_app(app: Flask, claimer: Claimer) -> Metrics:
    metrics_ = Metrics()
    metrics_.attach(claimer)
    app.extensions["idemhook.metrics"] = metrics_
    app.view_functions = _NotingViews(app.view_functions)
    app.wsgi_app = RequestTimer(app.wsgi_app, metrics_)  # type: ignore[method-assign]
    app.register_blueprint(bp)
    return metrics_
