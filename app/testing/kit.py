"""Sign and deliver events exactly as a source's scheme requires."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from idemhook._config.signing import encode, endpoint_url, find_source, signed_request, signing_url

__all__ = ["deliver", "encode", "signed"]


def signed(
    app: Flask,
    source: str,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    base_url: str = "http://localhost",
    client: str | None = None,
    key: str | None = None,
    tenant: str | None = None,
) -> tuple[str, bytes, dict[str, str]]:
    """Return ``(url, body, headers)`` of a request that ``source``'s scheme accepts.

    The URL is the source's ``path`` for an ``idempotency-key`` source that has one,
    else ``/webhooks/<source>``. ``client`` and ``key``: the client to sign as and
    the ``Idempotency-Key`` to send (``idempotency-key`` sources; default the first
    client and a new UUID). ``tenant``: a tenant of a source with ``tenants = true``,
    posted to ``/webhooks/<source>/<tenant>`` and signed with its first live secret in
    the database (add it first with ``idemhook secrets add``).
    """
    src = find_source(app, source)
    url = endpoint_url(base_url, src)
    keys = None
    if tenant is not None:
        url = f"{url}/{tenant}"
        _ids, keys = app.extensions["idemhook.receiver"].tenants.keys_for(src, tenant)
    body, all_headers = signed_request(
        src,
        payload,
        headers,
        url=signing_url(app, src, url, tenant),
        client=client,
        key=key,
        keys=keys,
    )
    return url, body, all_headers


def deliver(
    client: FlaskClient,
    source: str,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    as_client: str | None = None,
    key: str | None = None,
    tenant: str | None = None,
) -> TestResponse:
    """POST ``payload`` to ``source``, signed as the source's scheme requires.

    ``as_client`` and ``key``: the API client to sign as and the ``Idempotency-Key``
    (``idempotency-key`` sources). ``tenant``: post as that tenant of a source with
    ``tenants = true``, signed with its first live secret.
    """
    url, body, all_headers = signed(
        client.application, source, payload, headers, client=as_client, key=key, tenant=tenant
    )
    return client.post(url, data=body, headers=all_headers)
