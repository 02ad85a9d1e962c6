"""The outbox on the dashboard: what waits, what was sent, what gave up; and Retry.

Listings are the read API's (:func:`idemhook._store.queries.list_outbox`: newest first by
``(created_at, id)``, its keyset cursor), one message is
:func:`idemhook._store.queries.get_message`, and Retry is
:func:`idemhook._engine.outbox.retry`, what
``idemhook outbox retry`` runs (it also wakes the workers). What is read here
besides comes from indexes too, and is bounded (:mod:`idemhook._web.dashboard.counts`):

- **Pending**: counted from the worker's partial index of pending messages,
  exact up to :data:`~idemhook._web.dashboard.counts.CAP`; the oldest one's age is the
  oldest ``created_at`` among the ``CAP`` + 1 that fall due first (all of them
  while there are no more; past that the page says "≥").
- **Dead**: counted from the partial index of dead messages (migration 0008).
- **Sent** messages are not counted: their number only grows until pruned (the
  metrics leave them out for the same reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from idemhook._store import queries
from idemhook._store.models import outbox_messages
from idemhook._values.outbox_status import MESSAGE_STATUSES, MessageStatus
from idemhook._web.dashboard.counts import CAP, Count, bounded_count

OUTBOX = outbox_messages
STATUSES = MESSAGE_STATUSES
PAGE = 50
#: Characters of a result or a last error shown in a listing (the message's page has all).
BRIEF = 160
#: Messages of one event listed on its page.
PER_EVENT = 20


@dataclass(frozen=True, slots=True)
class Summary:
    pending: Count
    dead: Count
    oldest_pending: datetime | None
    #: False: more are pending than were read; the oldest is at least ``oldest_pending`` old.
    oldest_exact: bool


def summary(session: Session) -> Summary:
    pending = OUTBOX.c.status == str(MessageStatus.PENDING)
    soonest = (
        select(OUTBOX.c.created_at)
        .where(pending)
        .order_by(OUTBOX.c.next_attempt_at, OUTBOX.c.id)
        .limit(CAP + 1)
        .subquery()
    )
    read, oldest = session.execute(select(func.count(), func.min(soonest.c.created_at))).one()
    return Summary(
        pending=bounded_count(session, select(OUTBOX.c.id).where(pending)),
        dead=bounded_count(
            session, select(OUTBOX.c.id).where(OUTBOX.c.status == str(MessageStatus.DEAD))
        ),
        oldest_pending=oldest,
        oldest_exact=read <= CAP,
    )


def messages(
    session: Session, status: str | None, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of messages (the read API's), each with its ``result`` (by primary key)."""
    rows, next_cursor = queries.list_outbox(
        session, queries.OutboxFilters(status=status), PAGE, cursor
    )
    if rows:
        results = dict(
            session.execute(
                select(OUTBOX.c.id, OUTBOX.c.result).where(
                    OUTBOX.c.id.in_([row["id"] for row in rows])
                )
            ).all()
        )
        for row in rows:
            row["result"] = results.get(row["id"])
    return rows, next_cursor


def of_event(session: Session, source: str, event_id: str) -> list[dict[str, Any]]:
    """The messages an event's handlers added (its ``(source, event_id)`` index), oldest first."""
    found = session.execute(
        select(OUTBOX.c.id, OUTBOX.c.kind, OUTBOX.c.key, OUTBOX.c.status, OUTBOX.c.attempts)
        .where(OUTBOX.c.source == source, OUTBOX.c.event_id == event_id)
        .order_by(OUTBOX.c.id)
        .limit(PER_EVENT)
    )
    return [dict(row._mapping) for row in found]


def brief(value: Any, limit: int = BRIEF) -> str:
    """A value on one line, cut at ``limit`` characters: text as it is, anything else as JSON."""
    if value is None:
        return "-"
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    shown = " ".join(shown.split())
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
