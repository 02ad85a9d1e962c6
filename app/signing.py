"""Sign outgoing requests exactly as a source's scheme verifies them.

One place for the test kit (``app.testing``), ``idemhook sign`` and
``idemhook send``: what a provider's "send test event" button would send.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

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


def signing_url(app: Flask, source: Source, url: str) -> str:
    """The URL a signature must cover to verify when the request is posted to ``url``.

    The receiver checks a URL-signing scheme (HubSpot) against the public URL when
    one is configured (the source's ``public_url``, else ``IDEMHOOK_PUBLIC_URL``),
    not the address the request reached (``app.intake.public_url``): so the signer
    must too, or a test with production settings answers 401.
    """
    base = source.public_url or app.config.get("IDEMHOOK_PUBLIC_URL")
    if not base:
        return url
    query = urlsplit(url).query
    return webhook_url(base, source.name) + (f"?{query}" if query else "")


def webhook_url(base_url: str, source: str) -> str:
    """``<base_url>/webhooks/<source>``."""
    return f"{base_url.rstrip('/')}/webhooks/{source}"
