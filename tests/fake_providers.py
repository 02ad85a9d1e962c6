"""Local fakes of the provider APIs a reconcile run reads, served from a thread on 127.0.0.1.

- Stripe's events list, ``GET /v1/events``: ``created[gte]``, ``limit`` (at most 100),
  ``starting_after``; newest first; ``{"object": "list", "data": [...], "has_more": ...}``;
  ``Authorization: Bearer <key>`` or 401 with Stripe's error object.
- GitHub's hook deliveries, ``GET /<hook>/deliveries`` (``per_page``, ``cursor``; the
  next page in the ``Link`` header, ``rel="next"``) and ``GET /<hook>/deliveries/<id>``
  (the request's headers and payload); ``Authorization: Bearer <token>`` or 401.

Each serves at most :attr:`FakeProvider.page_size` items a page (fewer than the 100 asked
for, as the APIs may), so a run crosses several pages. A test scripts faults
(:meth:`FakeProvider.fault`: the n-th request of a kind answers, e.g., 429 or 500) and
work done while a request is being answered (:attr:`FakeProvider.on_request`: e.g. a live
delivery arriving during the run). :attr:`FakeProvider.requests` records what was asked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

STRIPE_KEY = "sk_test_reconcile_fake_key"
GITHUB_TOKEN = "ghp_reconcile_fake_token"
HOOK = "repos/acme/shop/hooks/4242"


@dataclass
class Fault:
    kind: str
    at: int
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


@dataclass
class Delivery:
    """A GitHub hook delivery: what the list shows, and the request GitHub sent."""

    id: int
    guid: str
    event: str
    delivered_at: datetime
    payload: dict[str, Any]
    redelivery: bool = False
    status_code: int = 502

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "guid": self.guid,
            "delivered_at": self.delivered_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "redelivery": self.redelivery,
            "duration": 0.02,
            "status": "failed to connect" if self.status_code >= 500 else "OK",
            "status_code": self.status_code,
            "event": self.event,
            "action": self.payload.get("action"),
            "installation_id": None,
            "repository_id": 1,
        }

    def detail(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "url": "https://hooks.example.com/webhooks/github",
            "request": {
                "headers": {
                    "Accept": "*/*",
                    "Content-Type": "application/json",
                    "User-Agent": "GitHub-Hookshot/abc1234",
                    "X-GitHub-Delivery": self.guid,
                    "X-GitHub-Event": self.event,
                    "X-GitHub-Hook-ID": HOOK.rsplit("/", 1)[1],
                    "X-Hub-Signature-256": "sha256=" + "0" * 64,
                },
                "payload": self.payload,
            },
            "response": {"headers": {}, "payload": None},
        }


class FakeProvider:
    """Both fakes on one server: ``url`` is the ``api_base`` of either."""

    def __init__(
        self,
        *,
        stripe_events: list[dict[str, Any]] | None = None,
        deliveries: list[Delivery] | None = None,
        page_size: int = 25,
    ) -> None:
        self.stripe_events = list(stripe_events or [])
        self.deliveries = list(deliveries or [])
        self.page_size = page_size
        self.faults: list[Fault] = []
        #: ``(kind, number, detail)`` before each answer: kind ``events``, ``deliveries`` or
        #: ``delivery``; number counts that kind's requests from 1; detail the query or the id.
        self.on_request: Callable[[str, int, Any], None] | None = None
        self.requests: list[dict[str, Any]] = []
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fault(self, kind: str, at: int, status: int, headers: dict[str, str] | None = None,
              body: Any = None) -> None:
        """Answer the ``at``-th request of ``kind`` with ``status`` instead."""
        self.faults.append(Fault(kind, at, status, headers or {}, body))

    def count(self, kind: str) -> int:
        with self._lock:
            return self._counts.get(kind, 0)

    # -- serving -----------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                status, headers, body = fake._answer(self)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _answer(self, request: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        if path == "/v1/events":
            kind, credential = "events", STRIPE_KEY
        elif path == f"/{HOOK}/deliveries":
            kind, credential = "deliveries", GITHUB_TOKEN
        elif path.startswith(f"/{HOOK}/deliveries/"):
            kind, credential = "delivery", GITHUB_TOKEN
        else:
            return 404, {}, {"message": "Not Found"}
        with self._lock:
            number = self._counts[kind] = self._counts.get(kind, 0) + 1
            self.requests.append(
                {
                    "kind": kind,
                    "number": number,
                    "query": query,
                    "authorization": request.headers.get("Authorization"),
                    "accept": request.headers.get("Accept"),
                    "api_version": request.headers.get("X-GitHub-Api-Version"),
                }
            )
            fault = next((f for f in self.faults if f.kind == kind and f.at == number), None)
        if request.headers.get("Authorization") != f"Bearer {credential}":
            if kind == "events":
                return 401, {}, {
                    "error": {
                        "type": "invalid_request_error",
                        "message": f"Invalid API Key provided: {credential[:8]}****",
                    }
                }
            return 401, {}, {"message": "Bad credentials"}
        if fault is not None:
            return fault.status, fault.headers, fault.body or {"message": f"fault {fault.status}"}
        detail: Any = query if kind != "delivery" else int(path.rsplit("/", 1)[1])
        if self.on_request is not None:
            self.on_request(kind, number, detail)
        if kind == "events":
            return 200, {}, self._events(query)
        if kind == "deliveries":
            return self._deliveries(request, query)
        found = next((d for d in self.deliveries if d.id == detail), None)
        if found is None:
            return 404, {}, {"message": "Not Found"}
        return 200, {}, found.detail()

    def _events(self, query: dict[str, str]) -> dict[str, Any]:
        events = sorted(self.stripe_events, key=lambda e: (e["created"], e["id"]), reverse=True)
        gte = int(query.get("created[gte]", "0"))
        events = [e for e in events if e["created"] >= gte]
        start = 0
        if "starting_after" in query:
            start = next(i for i, e in enumerate(events) if e["id"] == query["starting_after"]) + 1
        limit = min(int(query.get("limit", "10")), 100, self.page_size)
        page = events[start : start + limit]
        return {
            "object": "list",
            "data": page,
            "has_more": start + limit < len(events),
            "url": "/v1/events",
        }

    def _deliveries(
        self, request: BaseHTTPRequestHandler, query: dict[str, str]
    ) -> tuple[int, dict[str, str], Any]:
        listed = sorted(self.deliveries, key=lambda d: (d.delivered_at, d.id), reverse=True)
        start = int(query.get("cursor", "0"))
        per_page = min(int(query.get("per_page", "30")), 100, self.page_size)
        page = listed[start : start + per_page]
        headers = {}
        if start + per_page < len(listed):
            host = request.headers.get("Host")
            query = f"per_page={per_page}&cursor={start + per_page}"
            following = f"http://{host}/{HOOK}/deliveries?{query}"
            headers["Link"] = f'<{following}>; rel="next"'
        return 200, headers, [d.summary() for d in page]
