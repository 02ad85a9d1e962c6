"""One error hierarchy for everything idemhook answers with a non-2xx status.

Every error carries an HTTP ``status_code`` and a stable machine-readable
``code``; :func:`init_app` renders each one (and Werkzeug's own HTTP errors) as
``{"error": code, "message": text}``. Any other exception raised while serving a
request is a bug: it is answered ``500 internal_error`` and logged once, with its
traceback, on the ``idemhook.errors`` logger. The codes are a public contract
listed in ``docs/http.md``: add new ones, never rename.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("idemhook.errors")

#: The message of every ``internal_error``: the same for all, as the exception's own
#: text may quote the request (a payload key, a value that failed to convert).
INTERNAL_MESSAGE = (
    "The receiver failed unexpectedly; its log holds the traceback (logger idemhook.errors). "
    "Retrying is safe: an event that was applied is answered as a duplicate."
)


class ConfigError(Exception):
    """A setting or the sources file is wrong; start-up stops with this message."""


class IdemhookError(Exception):
    """Base of every error answered over HTTP."""

    status_code = 500
    code = "internal_error"
    #: The request body as read, when this error refused it after reading it (the intake
    #: sets it: a refused delivery's size and SHA-256 are recorded, never the body).
    body: bytes | None = None

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


class Forbidden(IdemhookError):
    status_code = 403
    code = "forbidden"


class NotFound(IdemhookError):
    status_code = 404
    code = "not_found"


class RetrySoon(IdemhookError):
    """Base of the answers that say "try again in a second": sent with ``Retry-After: 1``."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["Retry-After"] = "1"


class Conflict(RetrySoon):
    """409: what the request names is in use by another request still running."""

    status_code = 409
    code = "conflict"


class UnprocessableContent(IdemhookError):
    status_code = 422
    code = "unprocessable_content"


class PayloadTooLarge(IdemhookError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(IdemhookError):
    status_code = 415
    code = "unsupported_media_type"


class HandlerFailed(IdemhookError):
    status_code = 500
    code = "handler_failed"


class ServiceUnavailable(RetrySoon):
    """Temporary: the provider should retry. Answered with ``Retry-After``."""

    status_code = 503
    code = "database_unavailable"


# Werkzeug raises these itself (routing, reading the body); give them stable codes.
# Flask turns an exception that escapes every handler (one raised in an after_request
# hook or in an error handler) into a 500, answered internal_error too. Any status not
# listed, which nothing in idemhook is known to produce, is answered with the catch-all
# http_error: a client then still reads the status, and a code of another status would
# mislead it.
HTTP_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
}


def render(error: IdemhookError):
    response = jsonify(error.to_dict())
    response.status_code = error.status_code
    response.headers.update(error.headers)
    return response


def render_http(error: HTTPException):
    code = error.code or 500
    body = {
        "error": HTTP_CODES.get(code, "http_error"),
        "message": error.description or error.name,
    }
    if code == 413:
        body["message"] = "The request body is larger than this endpoint accepts."
    elif code == 500:
        body["message"] = INTERNAL_MESSAGE
    response = jsonify(body)
    response.status_code = code
    if code == 405 and error.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    return response


def _render_unexpected(error: Exception):
    """Answer 500 internal_error for an exception no other handler takes; log it once."""
    # The rule, not the path: a path is sender-chosen text (IDs, even newlines).
    rule = request.url_rule.rule if request.url_rule is not None else "(no route)"
    log.error(
        "unexpected %s in %s %s, answered 500 internal_error\n%s",
        _name(error),
        request.method,
        rule,
        traceback_without_messages(error),
    )
    return render(IdemhookError(INTERNAL_MESSAGE))


def traceback_without_messages(error: BaseException) -> str:
    """``error``'s traceback, causes first as Python prints it, each exception named by class.

    The messages are left out: they may quote the request (a payload key, a value that
    failed to convert, PostgreSQL's DETAIL line), and logs never carry payloads. The
    frames and a PostgreSQL error's SQLSTATE are enough to find the bug.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current = error
    while True:
        seen.add(id(current))
        frames = "".join(traceback.format_tb(current.__traceback__))
        sqlstate = getattr(current, "pgcode", None) or getattr(current, "sqlstate", None)
        withheld = f"SQLSTATE {sqlstate}, message not logged" if sqlstate else "message not logged"
        parts.append(f"Traceback (most recent call last):\n{frames}{_name(current)} ({withheld})")
        if current.__cause__ is not None:
            link, following = _CAUSE, current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, following = _CONTEXT, current.__context__
        else:
            break
        if id(following) in seen:
            break
        parts.append(link)
        current = following
    return "\n".join(reversed(parts))


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n"


def _name(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def init_app(app: Flask) -> None:
    app.register_error_handler(IdemhookError, render)
    app.register_error_handler(HTTPException, render_http)
    # Flask picks the most specific handler, so this one gets only what the two above
    # do not, in tests (TESTING) as in production.
    app.register_error_handler(Exception, _render_unexpected)
