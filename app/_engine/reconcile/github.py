"""GitHub's webhook deliveries: list a hook's deliveries, fetch the unknown ones
(docs/reconcile.md#github).

``GET /<hook>/deliveries?per_page=100``, then the ``Link`` header's ``rel="next"`` URL
(GitHub's cursor pagination), newest first, until a delivery older than the window.
The listing gives each delivery's ``guid`` (the live ``X-GitHub-Delivery``, kept by a
redelivery) and ``event`` (``X-GitHub-Event``): enough for the live source's ID, so only
deliveries idemhook has no claim of are fetched (``GET /<hook>/deliveries/<id>``), for
the request's headers and payload as GitHub sent them. ``ping`` deliveries are skipped:
the live source answers them without recording anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from typing import Any

from idemhook._config.reconcile import ReconcileConfig
from idemhook._contract import (
    Window,
)
from idemhook._engine.reconcile.base import Found, Unusable
from idemhook._engine.reconcile.http import ProviderError, ProviderHTTP

PAGE_SIZE = 100
API_VERSION = "2022-11-28"


class GitHubDeliveries:
    """The built-in reconciler of ``scheme = "github"`` sources."""

    def __init__(self, config: ReconcileConfig, wait: Callable[[float, str], None]) -> None:
        self.url = f"{config.api_base}/{config.hook}/deliveries"
        self.http = ProviderHTTP(
            "github",
            config.api_base,
            {
                "Authorization": f"Bearer {config.credential}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
            },
            wait,
        )

    def pages(self, window: Window) -> Iterator[list[Found]]:
        url: str | None = self.url
        params: dict[str, object] | None = {"per_page": PAGE_SIZE}
        while url is not None:
            body, response = self.http.get_json(url, params)
            if not isinstance(body, list) or not all(isinstance(d, dict) for d in body):
                raise ProviderError("GitHub's deliveries list answered without a list")
            page = []
            older = False
            for delivery in body:
                at = _time(delivery.get("delivered_at"))
                if at is not None and at < window.since:
                    older = True
                    continue
                if at is not None and at > window.until:
                    continue  # left to its live delivery
                guid, event, delivery_id = (
                    delivery.get("guid"),
                    delivery.get("event"),
                    delivery.get("id"),
                )
                if not isinstance(guid, str) or not isinstance(delivery_id, int):
                    raise ProviderError("GitHub listed a delivery without its guid or id")
                if event == "ping":
                    continue  # answered, never recorded, by the live source
                headers = {"X-GitHub-Delivery": guid}
                if isinstance(event, str):
                    headers["X-GitHub-Event"] = event
                page.append(Found(None, headers, load=partial(self._load, delivery_id)))
            yield page
            if older:
                return
            url = response.links.get("next", {}).get("url")
            params = None  # the next link carries the cursor and page size

    def _load(self, delivery_id: int) -> tuple[Any, dict[str, str]]:
        body, _response = self.http.get_json(f"{self.url}/{delivery_id}")
        request = body.get("request") if isinstance(body, dict) else None
        payload = request.get("payload") if isinstance(request, dict) else None
        headers = request.get("headers") if isinstance(request, dict) else None
        if not isinstance(payload, dict):
            raise Unusable(f"GitHub's delivery {delivery_id} holds no JSON request payload")
        found = {str(k): str(v) for k, v in (headers or {}).items() if v is not None}
        named = {k.lower() for k in found}
        listed = (("X-GitHub-Delivery", body.get("guid")), ("X-GitHub-Event", body.get("event")))
        for name, value in listed:
            if name.lower() not in named and isinstance(value, str):
                found[name] = value
        return payload, found

    def close(self) -> None:
        self.http.close()


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
