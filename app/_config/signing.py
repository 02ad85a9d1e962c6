"""Sign outgoing requests exactly as a source's scheme verifies them.

One place for the test kit (``idemhook.testing``), ``idemhook sign`` and
``idemhook send``: what a provider's "send test event" button would send.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from flask import Flask
from werkzeug.datastructures import Headers

from idemhook._config.schemes import Delivery
from idemhook._config.schemes.idempotency_key import KEY_HEADER, IdempotencyKey
from idemhook._config.sources import Source


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
    source: Source,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    url: str,
    client: str | None = None,
    key: str | None = None,
    keys: Sequence[bytes] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Return ``(body, headers)`` of a POST to ``url`` that ``source``'s scheme accepts.

    For an ``idempotency-key`` source, ``client`` names the client to sign as (default:
    the first) and ``key`` is the ``Idempotency-Key`` to send (default: a new UUID).
    ``keys``: sign with the first of these instead of the source's own secret (a tenant's).
    """
    body = encode(payload)
    all_headers = {"Content-Type": source.content_types[0], **(headers or {})}
    if key is not None:
        all_headers[KEY_HEADER] = key
    delivery = Delivery(body, Headers(all_headers), "POST", url)
    if client is not None:
        if not isinstance(source.scheme, IdempotencyKey):
            raise ValueError(f"source {source.name!r} has no clients (it is not idempotency-key)")
        all_headers.update(source.scheme.sign_as(delivery, client))
    elif keys is not None:
        all_headers.update(source.scheme.with_keys(keys[:1]).sign(delivery))
    elif not source.own_secret:
        raise ValueError(
            f"source {source.name!r} has no secret of its own: each of its tenants signs with "
            "its own (the test kit: deliver(..., tenant=...))"
        )
    else:
        all_headers.update(source.scheme.sign(delivery))
    return body, all_headers


def endpoint_url(base_url: str, source: Source) -> str:
    """Where clients POST to ``source``: its ``path`` (an API), else /webhooks/<source>."""
    path = getattr(source.scheme, "path", None)
    return f"{base_url.rstrip('/')}{path}" if path else webhook_url(base_url, source.name)


def signing_url(app: Flask, source: Source, url: str, tenant: str | None = None) -> str:
    """The URL a signature must cover to verify when the request is posted to ``url``.

    The receiver checks a URL-signing scheme (HubSpot) against the public URL when
    one is configured (the source's ``public_url``, else ``IDEMHOOK_PUBLIC_URL``),
    not the address the request reached (``idemhook._web.intake.public_url``): so the signer
    must too, or a test with production settings answers 401.
    """
    base = source.public_url or app.config.get("IDEMHOOK_PUBLIC_URL")
    if not base:
        return url
    query = urlsplit(url).query
    path = webhook_url(base, source.name) + (f"/{tenant}" if tenant is not None else "")
    return path + (f"?{query}" if query else "")


def webhook_url(base_url: str, source: str) -> str:
    """``<base_url>/webhooks/<source>``."""
    return f"{base_url.rstrip('/')}/webhooks/{source}"
