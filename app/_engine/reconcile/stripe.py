"""Stripe's events list: ``GET /v1/events`` (docs/reconcile.md#stripe).

``created[gte]`` = the window's start, ``limit=100``, then ``starting_after`` = the last
event's ``id`` while ``has_more`` (Stripe's cursor pagination; the list is newest first
and goes back 30 days). Each item is the event object a webhook delivers as its body,
so the live source reads the same ID from it (``body:id`` by default). Events created
after the window's end are left to their live delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from idemhook._config.reconcile import ReconcileConfig
from idemhook._contract import (
    Window,
)
from idemhook._engine.reconcile.base import Found
from idemhook._engine.reconcile.http import ProviderError, ProviderHTTP

PAGE_SIZE = 100


class StripeEvents:
    """The built-in reconciler of ``scheme = "stripe"`` sources."""

    def __init__(self, config: ReconcileConfig, wait: Callable[[float, str], None]) -> None:
        self.url = f"{config.api_base}/v1/events"
        self.http = ProviderHTTP(
            "stripe", config.api_base, {"Authorization": f"Bearer {config.credential}"}, wait
        )

    def pages(self, window: Window) -> Iterator[list[Found]]:
        params: dict[str, object] = {
            "created[gte]": int(window.since.timestamp()),
            "limit": PAGE_SIZE,
        }
        until = window.until.timestamp()
        while True:
            body, _response = self.http.get_json(self.url, params)
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
                raise ProviderError("Stripe's events list answered without a list of events")
            yield [
                Found(event)
                for event in data
                if not isinstance(event.get("created"), int | float) or event["created"] <= until
            ]
            if not body.get("has_more") or not data:
                return
            last = data[-1].get("id")
            if not isinstance(last, str) or not last:
                raise ProviderError("Stripe's events list holds an event without an id")
            params["starting_after"] = last

    def close(self) -> None:
        self.http.close()
