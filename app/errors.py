"""One error hierarchy for everything idemhook answers with a non-2xx status.

Every error carries an HTTP ``status_code`` and a stable machine-readable
``code``; :func:`init_app` renders each one (and Werkzeug's own HTTP errors) as
``{"error": code, "message": text}``. The codes are a public contract listed in
``docs/http.md``: add new ones, never rename.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException


class ConfigError(Exception):
    """A setting or the sources file is wrong; start-up stops with this message."""


class IdemhookError(Exception):
    """Base of every error answered over HTTP."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra
        self.headers: dict[str, str] = {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BadRequest(IdemhookError):
    status_code = 400
    code = "bad_request"


class Unauthorized(IdemhookError):
    status_code = 401
    code = "invalid_signature"


class NotFound(IdemhookError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(IdemhookError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(IdemhookError):
    status_code = 415
    code = "unsupported_media_type"


class HandlerFailed(IdemhookError):
    status_code = 500
    code = "handler_failed"


class ServiceUnavailable(IdemhookError):
    """Temporary: the provider should retry. Answered with ``Retry-After``."""

    status_code = 503
    code = "database_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["Retry-After"] = "1"


# Werkzeug raises these itself (routing, request size); give them stable codes.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def render(error: IdemhookError):
    response = jsonify(error.to_dict())
    response.status_code = error.status_code
    response.headers.update(error.headers)
    return response


def _render_http(error: HTTPException):
    code = error.code or 500
    body = {
        "error": _HTTP_CODES.get(code, "http_error"),
        "message": error.description or error.name,
    }
    if code == 413:
        body["message"] = "The request body is larger than this endpoint accepts."
    response = jsonify(body)
    response.status_code = code
    if code == 405 and error.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    return response


def init_app(app: Flask) -> None:
    app.register_error_handler(IdemhookError, render)
    app.register_error_handler(HTTPException, _render_http)
