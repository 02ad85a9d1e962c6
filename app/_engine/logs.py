"""One structured log line per event, as text or JSON (``IDEMHOOK_LOG_FORMAT``).

Each line carries source, event_id, event_type, outcome and duration_ms (and,
for a failed or rejected event, the handler and, if it raised, the exception's
class), and nothing else from the request: never a payload, a header, a
signature, a secret or an exception's message (which may quote the payload).
Lines go to stderr through the ``idemhook`` logger, which gunicorn
leaves alone, so they appear under gunicorn, ``flask run`` and the CLI alike.

An asynchronous source's event gets its line from ``idemhook worker`` when the
worker has applied it (with the attempt and the delay since receipt); its
acknowledgement by the web process is logged at DEBUG only.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from flask import Flask

from idemhook._contract import (
    Event,
)
from idemhook._engine.claim import Outcome
from idemhook._values.errors import ConfigError

log = logging.getLogger("idemhook.events")

FORMATS = ("text", "json")
#: The fields of an event line, in order (``handler`` and ``error`` only when set).
FIELDS = ("source", "event_id", "event_type", "outcome", "duration_ms", "handler", "error")
#: The fields of an outbox delivery line (app.sending), in order (``error`` only when set).
MESSAGE_FIELDS = ("kind", "message_id", "attempt", "outcome", "duration_ms", "error")
#: The worker's line for an asynchronous event (app.applying), in order.
APPLIED_FIELDS = (
    "source",
    "event_id",
    "event_type",
    "outcome",
    "attempt",
    "duration_ms",
    "delay_ms",
    "handler",
    "error",
    "retry_in_s",
)
#: A refused delivery's line (app._engine.refusals), in order (``recorded`` only when not).
REFUSED_FIELDS = ("source", "tenant", "code", "status", "client", "recorded")
_ALL_FIELDS = tuple(dict.fromkeys(FIELDS + MESSAGE_FIELDS + APPLIED_FIELDS + REFUSED_FIELDS))


def log_outcome(event: Event, outcome: Outcome, seconds: float, level: int = logging.INFO) -> None:
    """Log one line for ``event`` (a :class:`idemhook._engine.claim.Claimer` observer)."""
    if not log.isEnabledFor(level):
        return
    fields = {
        "source": event.source,
        "event_id": event.id,
        "event_type": event.type,
        "outcome": str(outcome.status),
        "duration_ms": round(seconds * 1000, 2),
    }
    if outcome.handler is not None:
        fields["handler"] = outcome.handler
    if outcome.error_type is not None:
        fields["error"] = outcome.error_type
    log_fields(log, level, fields)


#: An asynchronous source's acknowledgement (an ``Acceptor`` observer): at
#: DEBUG, since the event's INFO line is the worker's once it has applied the event (with
#: its attempt and delay, :mod:`idemhook._engine.applier`); the ack path, measured against a bare
#: receiver, does not pay for a second line unless asked to.
log_accepted = functools.partial(log_outcome, level=logging.DEBUG)


def log_fields(logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
    """One ``key=value`` line (a JSON object in json format) of ``fields``."""
    if not logger.isEnabledFor(level):
        return
    message = " ".join([f"{k}={_text(v)}" for k, v in fields.items()])
    handler = _only_ours(logger, level)
    if handler is not None and _write(handler, logger.name, level, message, fields):
        return
    # The record made directly: Logger.log would also look up the caller's frame, a
    # fifth of the line's cost, to name this function, which is known.
    record = logger.makeRecord(logger.name, level, __file__, _LINE, message, (), None, "log_fields")
    record.__dict__.update(fields)
    logger.handle(record)


_LINE = log_fields.__code__.co_firstlineno


def _only_ours(logger: logging.Logger, level: int) -> _Handler | None:
    """idemhook's stderr handler when it is the only thing that would see the record.

    Then the line is formatted and written here, as the handler would write it, without
    a ``LogRecord`` and the logging module's dispatch (about half of a line's cost,
    docs/performance.md). Anything else that could see or change the record sends it
    the logging module's way: a filter or another handler on the logger or its parents
    (pytest's capture, a plugin's, ``logging.basicConfig`` on the root logger), a
    record factory, a formatter of another class, or a handler level that drops it.
    """
    parent = logger.parent
    if (
        logger.disabled
        or logger.handlers
        or logger.filters
        or not logger.propagate
        or parent is None
        or parent.name != "idemhook"
        or parent.filters
        or len(parent.handlers) != 1
        or (parent.propagate and logging.root.handlers)
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    handler = parent.handlers[0]
    if (
        type(handler) is not _Handler
        or handler.filters
        or level < handler.level
        or type(handler.formatter) not in (TextFormatter, JsonFormatter)
    ):
        return None
    return handler


def _write(handler: _Handler, name: str, level: int, message: str, fields: dict) -> bool:
    """Write the line ``handler`` would write for this record; False: it could not."""
    created = time.time()
    formatter = handler.formatter
    if type(formatter) is TextFormatter:
        stamp = formatter.stamp(created)
        line = f"{stamp} {logging.getLevelName(level)} {name} {message}"
    else:
        line = JsonFormatter.line(created, level, name, fields)
    try:
        with handler.lock:  # as Handler.handle holds it around emit
            stream = handler.stream
            stream.write(line + handler.terminator)
            stream.flush()
    except Exception:  # noqa: BLE001 (the logging module's way: report, never raise)
        return False
    return True


def _text(value: Any) -> str:
    """``value`` written bare when it is printable ASCII but space, '"' and '=' (at least one
    character), else quoted as a JSON string: IDs and types come from senders, and must not
    forge a field or split the line. String methods, not a regular expression: a line's
    fields are checked on every event, and the matcher cost more (docs/performance.md)."""
    text = "-" if value is None else str(value)
    if (
        text
        and text.isascii()
        and text.isprintable()
        and " " not in text
        and '"' not in text
        and "=" not in text
    ):
        return text
    return json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the event fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {f: getattr(record, f) for f in _ALL_FIELDS if hasattr(record, f)}
        if fields and not record.exc_info:
            return self.line(record.created, record.levelno, record.name, fields)
        body = self._head(record.created, record.levelno, record.name)
        if fields:
            body.update(fields)
        else:
            body["message"] = record.getMessage()
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)

    @staticmethod
    def _head(created: float, level: int, name: str) -> dict[str, Any]:
        return {
            "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
            "level": logging.getLevelName(level).lower(),
            "logger": name,
        }

    @classmethod
    def line(cls, created: float, level: int, name: str, fields: dict[str, Any]) -> str:
        """The line of a record with these event ``fields`` (in :data:`_ALL_FIELDS` order)."""
        body = cls._head(created, level, name)
        body.update((f, fields[f]) for f in _ALL_FIELDS if f in fields)
        return json.dumps(body, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with each second's timestamp text worked out once, not per line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return self.stamp(record.created)

    def stamp(self, created: float) -> str:
        """``asctime`` of a record made at ``created``: ``2026-12-07 10:00:00,123``."""
        second = int(created)
        cached = self._second  # one tuple, replaced whole: safe across threads
        if cached[0] != second:
            text = time.strftime(self.default_time_format, self.converter(created))
            cached = self._second = (second, text)
        # As LogRecord works out msecs from its creation time.
        return self.default_msec_format % (cached[1], int((created - second) * 1000))


class _Handler(logging.StreamHandler):
    """idemhook's own stderr handler, installed once per process."""


def init_app(app: Flask) -> None:
    """Install the stderr handler with the configured format (once per process)."""
    fmt = str(app.config["IDEMHOOK_LOG_FORMAT"]).lower()
    if fmt not in FORMATS:
        raise ConfigError(f"IDEMHOOK_LOG_FORMAT must be text or json, got {fmt!r}")
    logger = logging.getLogger("idemhook")
    handler = next((h for h in logger.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler()
        logger.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
