"""``events replay``: run an event's handlers again, on demand, through the one handler path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from werkzeug.datastructures import Headers

from idemhook._config.freshness import Versioned, read
from idemhook._config.sources import Source
from idemhook._contract import (
    ClientEvent,
    Event,
)
from idemhook._engine.dispatch import (
    run_handlers,
)
from idemhook._engine.failures import ActionRefused
from idemhook._store import object_versions
from idemhook._store.models import processed_events
from idemhook._store.queries import get_event
from idemhook._store.session import (
    ClaimSession,
)
from idemhook._values.errors import BadRequest
from idemhook._values.outcome import Status


class ReplayFailed(Exception):
    """A handler raised or rejected during a replay; nothing it did was kept."""

    def __init__(self, message: str, status: Status) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Staleness:
    """Why replaying an event would apply data older than its object's (``events replay``)."""

    source: str
    event_id: str
    object_key: str
    version: Decimal
    newer: str
    newer_version: Decimal

    def __str__(self) -> str:
        return (
            f"event {self.event_id!r} is stale: its object {self.object_key!r} holds event "
            f"{self.newer!r} (version {self.newer_version}, newer than this event's "
            f"{self.version}); replaying it would overwrite newer data"
        )


def staleness(
    claimer: Any, sources: Mapping[str, Source], source: str, event_id: str
) -> Staleness | None:
    """Whether ``event_id`` is older than what its object holds now (None: it is not, or its
    source has no ``freshness``, or it has no stored payload to read its version from)."""
    freshness = _freshness(sources, source)
    if freshness is None:
        return None
    with claimer.database.session() as session:
        row = _row(session, source, event_id)
        if row is None or row.payload is None:
            return None
        versioned = _versioned(freshness, row)
        newer = object_versions.newer_than(
            session.connection(), source, versioned.object_key, versioned.version, event_id
        )
    if newer is None:
        return None
    return Staleness(source, event_id, versioned.object_key, versioned.version, *newer)


def replay(
    claimer: Any, source: str, event_id: str, sources: Mapping[str, Source] | None = None
) -> dict[str, Any]:
    """Run the handlers again for an already recorded event, in one transaction.

    The row is locked (``FOR UPDATE``) so that a concurrent replay or delivery
    waits. Handlers see the event as the live delivery did: the stored payload,
    the stored headers (those that may carry secrets are never stored) and the
    original ``received_at``. The new result, ``replayed_at`` and
    ``replay_count`` are written in the same transaction as the handlers' work.
    A handler that raises or rejects rolls all of it back and
    :class:`ReplayFailed` is raised: the stored row stays as it was.

    An asynchronous source's event is replayed the same way once ``idemhook
    worker`` has finished with it (a ``failed`` one is then applied here, and
    recorded as the handlers' outcome); one still waiting for the worker is refused.

    For a source with ``freshness`` (``sources`` holds it) the replay is applied as the
    newest version of its object, whatever was applied since: its handlers see it as
    fresh, a ``stale`` event becomes ``processed``, and its object's version moves to
    it, in the same transaction (under the object's lock, taken before the event's row).
    Whether that overwrites newer data is :func:`staleness`, which the CLI asks first.
    """
    events = processed_events
    freshness = _freshness(sources or {}, source)
    session: ClaimSession = claimer.sessions()
    session.begin()
    try:
        versioned = None
        if freshness is not None:
            found = _row(session, source, event_id)
            if found is not None and found.payload is not None:
                versioned = _versioned(freshness, found)
                object_versions.lock(session.connection(), source, versioned.object_key)
        query = select(events).where(events.c.source == source, events.c.event_id == event_id)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        row = session.execute(query).first()
        if row is None:
            raise ActionRefused(f"no event {event_id!r} from source {source!r}")
        if row.status == Status.RECEIVED:
            raise ActionRefused(
                f"event {event_id!r} has not been applied yet: it waits for idemhook worker "
                f"(failed attempts so far: {row.attempts}); `idemhook failures retry "
                f"{source} {event_id}` makes it due now"
            )
        if row.status == Status.IN_FLIGHT:
            raise ActionRefused(
                f"event {event_id!r} is in flight: the request that holds its key is running"
            )
        if row.payload is None:
            raise ActionRefused(
                f"event {event_id!r} has no stored payload (pruned with --payloads-only)"
            )
        registrations = claimer.registry.for_event(source, row.event_type)
        if not registrations:
            raise ActionRefused(f"no handler matches source {source!r} type {row.event_type!r}")
        headers = Headers(row.headers or {})
        fields = (source, event_id, row.event_type, row.payload, headers, row.received_at)
        # An idempotency-key source's row: the handlers see its client, as they did live;
        # a tenant's event, its tenant.
        event = (
            Event(*fields, row.tenant)
            if row.response_status is None
            else ClientEvent(*fields, row.client)
        )
        run = run_handlers(registrations, event, session, senders=claimer.registry.senders)
        if run.status is Status.REJECTED:
            raise ReplayFailed(
                f"a handler rejected the event ({run.result['rejected']}); nothing was changed "
                f"({run.handler})",
                run.status,
            )
        if run.status is Status.FAILED:
            raise ReplayFailed(
                f"a handler raised {type(run.error).__name__}: {run.error}; nothing was changed "
                f"({run.handler})",
                run.status,
            )
        now = datetime.now(UTC)
        changes: dict[str, Any] = {
            "result": run.result,
            "status": str(run.status),
            "processed_at": now,
            "replayed_at": now,
            "replay_count": events.c.replay_count + 1,
        }
        if row.response_status is not None:  # what the key's retries are answered from now on
            response = run.response
            changes["response_status"] = response.status if response else 200
            changes["response_headers"] = [list(h) for h in response.headers] if response else []
        session.execute(update(events).where(events.c.id == row.id).values(changes))
        if versioned is not None:
            object_versions.move(
                session.connection(), source, versioned.object_key, versioned.version, event_id
            )
        session.commit()
    finally:
        session.close()  # rolls back whatever did not commit
    with claimer.database.session() as reader:
        event_row = get_event(reader, source, event_id)
    if event_row is None:
        raise ActionRefused(f"event {event_id!r} was deleted while it was replayed")
    return event_row


def _freshness(sources: Mapping[str, Source], source: str) -> Any:
    found = sources.get(source)
    return found.freshness if found is not None else None


def _row(session: Session, source: str, event_id: str) -> Any:
    events = processed_events
    return session.execute(
        select(events.c.payload, events.c.headers).where(
            events.c.source == source, events.c.event_id == event_id
        )
    ).first()


def _versioned(freshness: Any, row: Any) -> Versioned:
    try:
        return read(freshness, row.payload, Headers(row.headers or {}))
    except BadRequest as exc:
        raise ActionRefused(
            f"the stored event no longer yields its object and version ({exc.message})"
        ) from None
