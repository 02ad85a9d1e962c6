"""Sign and deliver events exactly as a source's scheme requires."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from ..schemes import Delivery
from ..sources import Source


def _source(app: Flask, name: str) -> Source:
    sources = app.extensions["idemhook.receiver"].sources
    if name not in sources:
        raise KeyError(f"no source named {name!r}; configured: {sorted(sources)}")
    return sources[name]


def encode(payload: Any) -> bytes:
    """The body for ``payload``: bytes as they are, anything else as JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload).encode("utf-8")


def signed(
    app: Flask,
    source: str,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    base_url: str = "http://localhost",
) -> tuple[str, bytes, dict[str, str]]:
    """Return ``(url, body, headers)`` of a request that ``source``'s scheme accepts."""
    src = _source(app, source)
    body = encode(payload)
    url = f"{base_url.rstrip('/')}/webhooks/{source}"
    all_headers = {"Content-Type": src.content_types[0], **(headers or {})}
    from werkzeug.datastructures import Headers

    delivery = Delivery(body, Headers(all_headers), "POST", url)
    all_headers.update(src.scheme.sign(delivery))
    return url, body, all_headers


def deliver(
    client: FlaskClient,
    source: str,
    payload: Any,
    headers: dict[str, str] | None = None,
) -> TestResponse:
    """POST ``payload`` to ``/webhooks/<source>``, signed as the source's scheme requires."""
    url, body, all_headers = signed(client.application, source, payload, headers)
    return client.post(url, data=body, headers=all_headers)
