"""RFC 9457 problem details: how the errors of ``idempotency-key`` sources are answered.

An API's clients get ``application/problem+json`` as the IETF idempotency-key draft's
examples do: ``type`` (an absolute link to the code's page, which this server serves at
``/problems/<code>``, or to its entry in docs/idempotency-keys.md under
``IDEMHOOK_DOCS_URL``),
``title``, ``status``, ``detail``, plus idemhook's own ``error`` code and ``message`` as
extension members, so that a client written for idemhook's JSON errors reads these
too. Webhook sources keep the plain JSON errors of :mod:`idemhook._values.errors`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_current_url

from idemhook._values.errors import HTTP_CODES, IdemhookError, NotFound

CONTENT_TYPE = "application/problem+json"
#: The page every problem type links into (docs/idempotency-keys.md#<code>).
PAGE = "idempotency-keys.md"

#: A short, fixed summary per problem type (RFC 9457: the same for every occurrence).
TITLES = {
    "missing_idempotency_key": "Idempotency-Key missing",
    "invalid_idempotency_key": "Idempotency-Key invalid",
    "idempotency_key_in_use": "Idempotency-Key in use",
    "idempotency_key_mismatch": "Idempotency-Key reused for another request",
    "missing_credentials": "Credentials missing",
    "invalid_credentials": "Credentials invalid",
    "missing_signature": "Signature missing",
    "invalid_signature": "Signature invalid",
    "handler_failed": "Operation failed",
    "internal_error": "Internal error",
}


#: What each problem means and what the client can do about it (the ``/problems`` pages).
DESCRIPTIONS = {
    "missing_idempotency_key": "The request has no Idempotency-Key header. Send a new, "
    "unique key with every new request, and the same key with each retry of it.",
    "invalid_idempotency_key": "The Idempotency-Key header is empty, longer than 255 "
    "characters, or neither a bare key nor a quoted string.",
    "idempotency_key_in_use": "Another request with this key is running now (or its "
    "record is locked). Retry after the Retry-After seconds with the same key: you will "
    "get its answer.",
    "idempotency_key_mismatch": "This key was used for a different request (another "
    "method, path, Content-Type or body). Nothing ran. Use a new key for a new request.",
    "missing_credentials": "The request carries no credentials (bearer token or signature).",
    "invalid_credentials": "The credentials are not valid for this API.",
    "missing_signature": "The request is not signed.",
    "invalid_signature": "The signature does not match the body.",
    "handler_failed": "The operation raised an error and nothing of it was kept. Retry "
    "with the same key (unless the API replays errors: then the answer is stored).",
    "handler_timeout": "The operation ran too long; nothing of it was kept. Retry with the "
    "same key shortly.",
    "database_unavailable": "The database could not be reached; nothing was recorded. "
    "Retry with the same key shortly.",
    "server_busy": "Every worker is held by operations that ran too long. Retry shortly.",
    "payload_too_large": "The request body is larger than this API accepts.",
    "unsupported_media_type": "The request's Content-Type is not one this API accepts.",
    "invalid_json": "The request body is not valid JSON.",
    "invalid_event": "The request body is JSON, but not the object this API takes.",
    "internal_error": "Something failed on the server. Retry with the same key.",
}
_CODE = re.compile(r"[a-z][a-z_]{0,63}")


def type_uri(code: str) -> str:
    """The problem type of ``code``: an absolute link to a page that explains it.

    Under ``IDEMHOOK_DOCS_URL`` (where you publish docs/ for your clients), its entry
    in docs/idempotency-keys.md; else this server's own ``/problems/<code>`` page,
    under ``IDEMHOOK_PUBLIC_URL`` or the request's own base URL.
    """
    return type_uri_of(current_app.config, request.environ, code)


def type_uri_of(config: Mapping[str, Any], environ: Mapping[str, Any], code: str) -> str:
    """:func:`type_uri` from the app's ``config`` and the request's WSGI ``environ``."""
    docs = config.get("IDEMHOOK_DOCS_URL")
    if docs:
        return f"{docs.rstrip('/')}/{PAGE}#{code}"
    base = config.get("IDEMHOOK_PUBLIC_URL") or _host_url(
        environ.get("wsgi.url_scheme", "http"),
        environ.get("HTTP_HOST"),
        environ.get("SERVER_NAME"),
        environ.get("SERVER_PORT"),
        environ.get("SCRIPT_NAME", ""),
    )
    return f"{base.rstrip('/')}/problems/{code}"


@lru_cache(maxsize=64)
def _host_url(scheme: str, host: str | None, name: str | None, port: str | None, root: str) -> str:
    """``request.host_url`` (scheme, host and root path) of the environ these come from:
    Werkzeug's quoting, worked out once per host a server is called at, not per request."""
    environ = {"wsgi.url_scheme": scheme, "SCRIPT_NAME": root}
    for key, value in (("HTTP_HOST", host), ("SERVER_NAME", name), ("SERVER_PORT", port)):
        if value is not None:
            environ[key] = value
    return get_current_url(environ, root_only=True)


def init_app(app: Flask) -> None:
    """Serve ``GET /problems/<code>``: what a problem type means (the ``type`` links here)."""
    app.add_url_rule("/problems/<code>", "problem_page", _page, methods=["GET"])


def _page(code: str) -> Response:
    if not _CODE.fullmatch(code) or code not in DESCRIPTIONS:
        raise NotFound(
            f"No problem type {code!r}: see /problems/<code> for the ones listed.",
            code="unknown_problem_type",
        )
    title = TITLES.get(code) or code.replace("_", " ").capitalize()
    page = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><p><code>{code}</code></p>"
        f"<p>{html.escape(DESCRIPTIONS[code])}</p></html>"
    )
    return Response(page, mimetype="text/html")


def problem(status: int, code: str, detail: str, **extra: object) -> Response:
    """A problem details answer."""
    body = {
        "type": type_uri(code),
        "title": TITLES.get(code) or code.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        "error": code,
        "message": detail,
        **extra,
    }
    response = jsonify(body)
    response.status_code = status
    response.content_type = CONTENT_TYPE
    return response


def render(error: IdemhookError) -> Response:
    """``error`` as problem details, with its headers (``Retry-After``, ``WWW-Authenticate``)."""
    response = problem(error.status_code, error.code, error.message, **error.extra)
    response.headers.update(error.headers)
    return response


def render_http(error: HTTPException) -> Response:
    """An error Werkzeug raised while the request was read (413, a body cut short: 400)."""
    status = error.code or 500
    code = HTTP_CODES.get(status, "http_error")
    detail = error.description or error.name
    if status == 413:
        detail = "The request body is larger than this endpoint accepts."
    return problem(status, code, detail)
