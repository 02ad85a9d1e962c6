"""``events replay``: run an event's handlers again, on demand, through the one handler path."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from werkzeug.datastructures import Headers

from idemhook._contract import (
    ClientEvent,
    Event,
)
from idemhook._engine.dispatch import (
    run_handlers,
)
from idemhook._engine.failures import ActionRefused
from idemhook._store.models import processed_events
from idemhook._store.queries import get_event
from idemhook._store.session import (
    ClaimSession,
)
from idemhook._values.outcome import Status


class ReplayFailed(Exception):
    """A handler raised or rejected during a replay; nothing it did was kept."""

    def __init__(self, message: str, status: Status) -> None:
        super().__init__(message)
        self.status = status


def replay(claimer: Any, source: str, event_id: str) -> dict[str, Any]:
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
    """
    events = processed_events
    session: ClaimSession = claimer.sessions()
    session.begin()
    try:
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
        # An idempotency-key source's row: the handlers see its client, as they did live.
        event = Event(*fields) if row.response_status is None else ClientEvent(*fields, row.client)
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
        session.commit()
    finally:
        session.close()  # rolls back whatever did not commit
    with claimer.database.session() as reader:
        event_row = get_event(reader, source, event_id)
    if event_row is None:
        raise ActionRefused(f"event {event_id!r} was deleted while it was replayed")
    return event_row
