"""Sign outgoing requests exactly as a source's scheme verifies them.

One place for the test kit (``app.testing``), ``idemhook sign`` and
``idemhook send``: what a provider's "send test event" button would send.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask
from werkzeug.datastructures import Headers

from .schemes import Delivery
from .sources import Source


def find_source(app: Flask, name: str) -> Source:
    """The configured source ``name``; KeyError naming the configured ones otherwise."""
    sources = app.extensions["idemhook.receiver"].sources
    if name not in sources:
        raise KeyError(f"no source named {name!r}; configured: {', '.join(sorted(sources))}")
    return sources[name]


def encode(payload: Any) -> bytes:
    """The body for ``payload``: bytes as they are, text as UTF-8, anything else as JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload).encode("utf-8")


def signed_request(
    source: Source, payload: Any, headers: dict[str, str] | None = None, *, url: str
) -> tuple[bytes, dict[str, str]]:
    """Return ``(body, headers)`` of a POST to ``url`` that ``source``'s scheme accepts."""
    body = encode(payload)
    all_headers = {"Content-Type": source.content_types[0], **(headers or {})}
    all_headers.update(source.scheme.sign(Delivery(body, Headers(all_headers), "POST", url)))
    return body, all_headers


def webhook_url(base_url: str, source: str) -> str:
    """``<base_url>/webhooks/<source>``."""
    return f"{base_url.rstrip('/')}/webhooks/{source}"
