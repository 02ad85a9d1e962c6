"""Sign and deliver events exactly as a source's scheme requires."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from ..signing import encode, find_source, signed_request, signing_url, webhook_url

__all__ = ["deliver", "encode", "signed"]


def signed(
    app: Flask,
    source: str,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    base_url: str = "http://localhost",
) -> tuple[str, bytes, dict[str, str]]:
    """Return ``(url, body, headers)`` of a request that ``source``'s scheme accepts."""
    url = webhook_url(base_url, source)
    src = find_source(app, source)
    body, all_headers = signed_request(src, payload, headers, url=signing_url(app, src, url))
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
