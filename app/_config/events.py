"""Split a verified body into events and read each one's ID and type.

Shared by the intake (``POST /webhooks/<source>``), ``failures retry``, which
parses a stored raw body exactly as it was parsed on receipt, and reconcile runs,
which read a provider's logged events exactly as the live source reads a delivery.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from idemhook._config.locators import MISSING, Composite, Locator
from idemhook._config.sources import Source
from idemhook._contract import (
    Event,
)
from idemhook._values.errors import BadRequest

MAX_ID_LENGTH = 255


def events_of(source: Source, payload: Any, headers: Any, received_at: datetime) -> list[Event]:
    """Split the body into events and read each one's ID and type."""
    if source.batch is None:
        items = [payload]
    else:
        items = source.batch.read(payload, headers)
        if not isinstance(items, list) or not items:
            where = "the body" if not source.batch.parts else f"{source.batch}"
            raise BadRequest(
                f"Source {source.name!r} expects a non-empty JSON array of events at {where}.",
                code="invalid_batch",
            )
        if len(items) > source.max_batch:
            raise BadRequest(
                f"The batch holds {len(items)} events; source {source.name!r} accepts at most "
                f"{source.max_batch} (max_batch).",
                code="batch_too_large",
            )
    events = []
    for item in items:  # event_of's body, inline: this loop is on every delivery's path
        if not isinstance(item, dict):
            raise BadRequest("Each event must be a JSON object.", code="invalid_event")
        event_id = _identifier(source.event_id, item, headers, "event_id")
        event_type = (
            _identifier(source.event_type, item, headers, "event_type")
            if source.event_type is not None
            else None
        )
        events.append(Event(source.name, event_id, event_type, item, headers, received_at))
    return events


def for_tenant(event: Event, tenant: str) -> Event:
    """``event`` as a tenant's: its ID scoped to the tenant (``<tenant>:<id>``), as stored."""
    return replace(event, id=f"{tenant}:{event.id}", tenant=tenant)


def event_of(source: Source, item: Any, headers: Any, received_at: datetime) -> Event:
    """One event (an element of a batch, or a reconcile run's find) with its ID and type."""
    if not isinstance(item, dict):
        raise BadRequest("Each event must be a JSON object.", code="invalid_event")
    event_id = _identifier(source.event_id, item, headers, "event_id")
    event_type = (
        _identifier(source.event_type, item, headers, "event_type")
        if source.event_type is not None
        else None
    )
    return Event(source.name, event_id, event_type, item, headers, received_at)


def event_id_of(source: Source, item: Any, headers: Any) -> str | None:
    """The event ID of ``item`` if what is known of it holds one, else None (no error)."""
    try:
        return _identifier(source.event_id, item, headers, "event_id")
    except BadRequest:
        return None


def order_keys_of(source: Source, events: list[Event]) -> list[str]:
    """Each event's order key, read where the source's ``order_key`` points (docs/async.md).

    Checked like an event ID (400 ``missing_order_key``, ``invalid_order_key``),
    before anything is stored.
    """
    locator = source.order_key
    if locator is None:
        raise ValueError(f"source {source.name!r} has no order_key")
    return [_identifier(locator, e.payload, e.headers, "order_key") for e in events]


def _identifier(locator: Locator, item: Any, headers: Any, key: str) -> str:
    """Read an event ID or type and check it can be stored and compared as-is."""
    value = locator.read(item, headers)
    if value is MISSING or value is None:
        where = locator.missing(item, headers) if isinstance(locator, Composite) else locator
        raise BadRequest(
            f"The {key.replace('_', ' ')} is missing: expected it at {where}.",
            code=f"missing_{key}",
        )
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(
            f"The {key.replace('_', ' ')} at {locator} must be a string, "
            f"not {type(value).__name__}.",
            code=f"invalid_{key}",
        )
    problem = None
    if value == "":
        problem = "is empty"
    elif len(value) > MAX_ID_LENGTH:
        problem = f"is {len(value)} characters long (at most {MAX_ID_LENGTH})"
    elif "\x00" in value:
        problem = "contains a NUL character"
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid Unicode (a lone surrogate)"
    if problem:
        raise BadRequest(
            f"The {key.replace('_', ' ')} at {locator} {problem}.", code=f"invalid_{key}"
        )
    return value


def event_type_of(source: Source, item: Any, headers: Any) -> str | None:
    """The event type of ``item`` where ``source.event_type`` points (None when unset)."""
    if source.event_type is None:
        return None
    return _identifier(source.event_type, item, headers, "event_type")
