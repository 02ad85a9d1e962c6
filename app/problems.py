"""RFC 9457 problem details: how the errors of ``idempotency-key`` sources are answered.

An API's clients get ``application/problem+json`` as the IETF idempotency-key draft's
examples do: ``type`` (a link to the code's entry in docs/idempotency-keys.md),
``title``, ``status``, ``detail``, plus idemhook's own ``error`` code and ``message`` as
extension members, so that a client written for idemhook's JSON errors reads these
too. Webhook sources keep the plain JSON errors of :mod:`app.errors`.
"""

from __future__ import annotations

from flask import Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from .errors import HTTP_CODES, IdemhookError

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


def type_uri(code: str) -> str:
    """The problem type of ``code``: its entry in docs/idempotency-keys.md.

    Relative (``docs/idempotency-keys.md#<code>``) unless ``IDEMHOOK_DOCS_URL`` says
    where the docs are published for your clients.
    """
    base = current_app.config.get("IDEMHOOK_DOCS_URL") or "docs"
    return f"{base.rstrip('/')}/{PAGE}#{code}"


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
