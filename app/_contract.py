"""The contract between idemhook and its plugins: the types a handler or sender sees.

What ``from idemhook import ...`` exports for plugin authors (docs/plugins.md): the
:class:`Event` a handler gets, what it may return (:class:`Ignore`, :class:`Reject`,
:class:`Response`, or a plain result), the :class:`Message` a sender gets. The lowest
layer of the package: it imports nothing of idemhook's, so anything may import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

from werkzeug.datastructures import Headers


class Outbox(Protocol):
    """``event.outbox``: adds outbox messages in the event's transaction (docs/outbox.md)."""

    event: Event

    def add(self, kind: str, payload: Any = None, key: str | None = None) -> int: ...


#: The outbox of the event whose handlers run now (set around each run by the engine).
current_outbox: ContextVar[Outbox | None] = ContextVar("idemhook_outbox", default=None)


class HandlerChoice:
    """Base of what a handler may return instead of a plain result (one check per result)."""


class HandlerOutcome(HandlerChoice, Exception):
    """Base of the outcomes a handler may return, or raise from deep inside its helpers."""

    #: Key of the stored result, and the event's status when this outcome decides it.
    status: str = ""

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str) or not reason:
            raise TypeError(f"{type(self).__name__}(reason): reason must be a non-empty string")
        super().__init__(reason)
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"

    def result(self) -> dict[str, str]:
        return {self.status: self.reason}


class Ignore(HandlerOutcome):
    """The handler chose not to act on this event (answered 200, status ``ignored``)."""

    status = "ignored"


class Reject(HandlerOutcome):
    """The event is permanently bad: roll back, record it as failed for good, answer 200."""

    status = "rejected"


#: Statuses a handler's :class:`Response` may choose: success and the client's errors.
#: 5xx stay idemhook's own (a raised exception: rolled back, the key free for the retry).
RESPONSE_STATUSES = range(200, 500)
#: Response headers a handler may set besides ``X-*`` ones (compared case-insensitively).
RESPONSE_HEADERS = ("Location", "Content-Location", "ETag", "Link")
#: The one other header a handler may set: the body is JSON, so a JSON media type
#: (``application/json``, or ``application/<x>+json`` such as ``application/problem+json``).
CONTENT_TYPE = "Content-Type"
_JSON_MEDIA_TYPE = re.compile(r"^application/([a-z0-9][a-z0-9.!#$&^_-]*\+)?json$")


class Response(HandlerChoice):
    """The HTTP answer of an ``idempotency-key`` source's operation, stored and replayed.

    ``status`` 200-499; ``body`` anything JSON can hold (stored as the result);
    ``headers`` a mapping or ``(name, value)`` pairs, names from
    :data:`RESPONSE_HEADERS` or starting ``X-``, and ``Content-Type`` with a JSON
    media type (``application/problem+json`` for an error as RFC 9457 problem
    details). Checked here, so a mistake fails in the handler's own line.
    """

    __slots__ = ("status", "body", "headers")

    def __init__(
        self,
        status: int = 200,
        body: Any = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"Response(status): a whole number from 200 to 499, not {status!r}")
        if status not in RESPONSE_STATUSES:
            raise ValueError(
                f"Response(status): {status} is not 200-499 (5xx are idemhook's: raise instead)"
            )
        pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
        checked = []
        for pair in pairs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"Response(headers): expected (name, value) pairs, got {pair!r}")
            name, value = pair
            name = _header_name(name)
            checked.append((name, _header_value(name, value)))
        self.status = status
        self.body = body
        self.headers: tuple[tuple[str, str], ...] = tuple(checked)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body!r}, {dict(self.headers)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return (self.status, self.body, self.headers) == (other.status, other.body, other.headers)


def _header_name(name: Any) -> str:
    allowed = {h.lower(): h for h in (*RESPONSE_HEADERS, CONTENT_TYPE)}
    if isinstance(name, str) and name.lower() in allowed:
        return allowed[name.lower()]
    if (
        isinstance(name, str)
        and name[:2].lower() == "x-"
        and len(name) > 2
        and all(c.isascii() and (c.isalnum() or c == "-") for c in name)
    ):
        return name
    raise ValueError(
        f"Response(headers): {name!r} is not allowed; use {', '.join(RESPONSE_HEADERS)}, "
        "an X-* header or Content-Type (a JSON media type)"
    )


def _header_value(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Response(headers): the value of {name} must be a string")
    if any(c in value for c in "\r\n\x00") or not value.isascii():
        raise ValueError(
            f"Response(headers): the value of {name} must be ASCII without CR, LF or NUL"
        )
    if name == CONTENT_TYPE:
        value = value.strip().lower()
        if not _JSON_MEDIA_TYPE.match(value):
            raise ValueError(
                f"Response(headers): Content-Type {value!r} is not a JSON media type (the "
                "body is sent as JSON): application/json or application/<x>+json, e.g. "
                "application/problem+json"
            )
    return value


@dataclass(frozen=True, slots=True)
class Event:
    """One event as a handler sees it."""

    source: str
    id: str
    type: str | None
    payload: Any
    headers: Headers = field(repr=False)
    received_at: datetime
    #: The tenant that sent the event (``POST /webhooks/<source>/<tenant>``, a source with
    #: ``tenants = true``); None for a source's own endpoint. Its ``id`` is then
    #: ``<tenant>:<provider's id>``, so that IDs are unique per tenant.
    tenant: str | None = None
    #: The API client that sent the request (its name under ``clients``, an
    #: ``idempotency-key`` source); None otherwise. A class attribute here, a field of
    #: :class:`ClientEvent`, so that webhook events cost nothing more to build.
    client: ClassVar[str | None] = None
    #: True for an event of a source with ``freshness`` that is older than the version
    #: already applied to its object: only ``stale=True`` handlers see such an event.
    stale: ClassVar[bool] = False

    @property
    def outbox(self) -> Outbox:
        """Add outbox messages in this event's transaction (only while its handlers run)."""
        box = current_outbox.get()
        if box is None or box.event is not self:
            raise RuntimeError(
                "event.outbox is usable only inside a handler, while it handles that event "
                "(the message is added in the event's transaction; see docs/outbox.md)"
            )
        return box


@dataclass(frozen=True, slots=True)
class ClientEvent(Event):
    """An event of an ``idempotency-key`` source: the request of a named client (or None)."""

    client: str | None = None

    def __init__(
        self,
        source: str,
        id: str,
        type: str | None,
        payload: Any,
        headers: Headers,
        received_at: datetime,
        client: str | None = None,
        *,
        tenant: str | None = None,
    ) -> None:
        # ``client`` stays the seventh positional argument (before ``tenant``, which an
        # idempotency-key source never has; a keyword, for dataclasses.replace).
        Event.__init__(self, source, id, type, payload, headers, received_at, tenant)
        object.__setattr__(self, "client", client)


@dataclass(frozen=True, slots=True)
class StaleEvent(Event):
    """An event older than the version already applied to its object (``stale=True``)."""

    stale: bool = True

    @classmethod
    def of(cls, event: Event) -> StaleEvent:
        return cls(
            event.source,
            event.id,
            event.type,
            event.payload,
            event.headers,
            event.received_at,
            event.tenant,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox message as a sender gets it.

    ``key`` is stable for the message's whole life: hand it to any provider that
    accepts an idempotency key. ``attempts`` counts this attempt (1 on the first).
    """

    id: int
    kind: str
    key: str
    payload: Any
    attempts: int
    created_at: datetime
    source: str | None = None
    event_id: str | None = None


HandlerFunc = Callable[[Event, Any], Any]
SenderFunc = Callable[[Message], Any]


def result_of(results: Mapping[str, Any]) -> Any:
    """Combine handler return values into the stored ``result`` (see the contract above)."""
    if len(results) == 1:
        return next(iter(results.values()))
    return dict(results) if results else None


@dataclass(frozen=True, slots=True)
class Window:
    """The time a reconcile run asks about: events from ``since`` until ``until`` (aware UTC)."""

    since: datetime
    until: datetime
