"""The outbox on the dashboard, once the outbox exists (its table ``outbox_messages``).

The outbox is another issue's (``event.outbox``, ``idemhook worker``). The
dashboard finds its table by inspection and reads the columns it has: status
(``pending``, ``sent``, ``dead``), attempts, next attempt, last error. Without
the table the overview leaves the outbox out and ``/dashboard/outbox`` says so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import MetaData, Table, inspect, select, update
from sqlalchemy.orm import Session

from .counts import Count, bounded_count

TABLE = "outbox_messages"
STATUSES = ("pending", "sent", "dead")
#: Columns shown, in this order, when the table has them.
SHOWN = (
    "id",
    "kind",
    "key",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
    "sent_at",
    "last_error",
)
PAGE = 50

_reflected: dict[str, Table] = {}
_lock = threading.Lock()


def table(session: Session) -> Table | None:
    """The outbox table as the database has it, or None while it does not exist."""
    connection = session.connection()
    if not inspect(connection).has_table(TABLE):
        return None
    key = connection.engine.url.render_as_string(hide_password=True)
    with _lock:
        found = _reflected.get(key)
        if found is None:
            found = _reflected[key] = Table(TABLE, MetaData(), autoload_with=connection)
    return found


@dataclass
class Summary:
    counts: dict[str, Count]
    oldest_pending: datetime | None


def _created(t: Table) -> Any:
    for name in ("created_at", "next_attempt_at"):
        if name in t.c:
            return t.c[name]
    return None


def summary(session: Session) -> Summary | None:
    t = table(session)
    if t is None:
        return None
    counts = {
        status: bounded_count(session, select(t.c.id).where(t.c.status == status))
        for status in STATUSES
    }
    oldest = None
    created = _created(t)
    if created is not None and counts["pending"].value:
        oldest = session.execute(
            select(created).where(t.c.status == "pending").order_by(created).limit(1)
        ).scalar()
    return Summary(counts, oldest)


def messages(
    session: Session, t: Table, status: str | None, before: int | None
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of messages, newest first (by id), and the id to continue before."""
    columns = [t.c[name] for name in SHOWN if name in t.c]
    query = select(*columns)
    if status:
        query = query.where(t.c.status == status)
    if before is not None:
        query = query.where(t.c.id < before)
    found = session.execute(query.order_by(t.c.id.desc()).limit(PAGE + 1))
    rows = [dict(r._mapping) for r in found]
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    return rows, (rows[-1]["id"] if more and rows else None)


def retry(session: Session, t: Table, ids: list[int]) -> int:
    """Make these messages due now (a ``dead`` one ``pending`` again); sent ones are left."""
    values: dict[str, Any] = {"status": "pending"}
    if "next_attempt_at" in t.c:
        values["next_attempt_at"] = datetime.now(UTC)
    done = session.execute(
        update(t).where(t.c.id.in_(ids), t.c.status != "sent").values(**values)
    )
    session.commit()
    return int(done.rowcount or 0)
