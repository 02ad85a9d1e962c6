"""``reconcile_runs``: a run's row is its record and its fence (docs/reconcile.md).

- **One run per source at a time**: a run begins by inserting its row, unfinished
  (``finished_at IS NULL``), which a partial unique index allows once per source. The
  insert is ``ON CONFLICT DO NOTHING``: a second worker (or ``idemhook reconcile``)
  gets no row back and leaves the source alone. Plain rows and a unique index, each
  statement in its own short transaction: no session state, so it holds behind
  PgBouncer's transaction mode, where a session-level advisory lock would not.
- **One run per slot**: a worker's run is for one slot of ``every`` (``scheduled_for``,
  unique with the source), so however many workers share the schedule, each slot is
  run once.
- **A holder that vanished** (killed, lost its machine) stops renewing ``lease_until``;
  the next run to begin finishes such a row as ``abandoned`` first. Every later write of
  the vanished run is fenced by ``finished_at IS NULL`` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from idemhook._store.models import reconcile_runs as TABLE

RUNNING = "running"
ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class Counts:
    """A run's figures so far."""

    seen: int = 0
    already: int = 0
    recovered: int = 0
    failed: int = 0

    def values(self) -> dict[str, int]:
        return {
            "seen": self.seen,
            "already": self.already,
            "recovered": self.recovered,
            "failed": self.failed,
        }


def begin(
    engine: Engine,
    *,
    source: str,
    started_by: str,
    window_start: datetime,
    window_end: datetime,
    owner: str,
    lease: timedelta,
    scheduled_for: datetime | None = None,
) -> int | None:
    """Insert a running run of ``source``; its id, or None when the fence refuses it.

    Refused while another run of the source is unfinished (and its lease holds), and
    for a slot (``scheduled_for``) that was run already. An unfinished run whose lease
    ran out is finished as ``abandoned`` first, in the same transaction.
    """
    now = datetime.now(UTC)
    dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(TABLE)
        .values(
            source=source,
            started_by=started_by,
            scheduled_for=scheduled_for,
            window_start=window_start,
            window_end=window_end,
            started_at=now,
            outcome=RUNNING,
            owner=owner[:128],
            lease_until=now + lease,
        )
        .on_conflict_do_nothing()
        .returning(TABLE.c.id)
    )
    with engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(
                TABLE.c.source == source,
                TABLE.c.finished_at.is_(None),
                TABLE.c.lease_until < now,
            )
            .values(
                outcome=ABANDONED,
                finished_at=now,
                lease_until=None,
                error="its process stopped renewing its lease (killed, or cut off from the "
                "database) before it finished",
            )
        )
        return conn.execute(statement).scalar()


def renew(engine: Engine, run_id: int, lease: timedelta, counts: Counts) -> bool:
    """Extend the run's lease and store its figures so far; False when it is not ours any more."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        changed = conn.execute(
            update(TABLE)
            .where(TABLE.c.id == run_id, TABLE.c.finished_at.is_(None))
            .values(lease_until=now + lease, **counts.values())
        ).rowcount
    return changed == 1


def finish(engine: Engine, run_id: int, outcome: str, counts: Counts, error: str | None) -> bool:
    """Record how the run ended; False when it had been taken over (finished as abandoned)."""
    with engine.begin() as conn:
        changed = conn.execute(
            update(TABLE)
            .where(TABLE.c.id == run_id, TABLE.c.finished_at.is_(None))
            .values(
                outcome=outcome,
                finished_at=datetime.now(UTC),
                lease_until=None,
                error=error,
                **counts.values(),
            )
        ).rowcount
    return changed == 1


def running(engine: Engine, source: str) -> dict[str, Any] | None:
    """The unfinished run of ``source``, if any: its id, owner, start and lease."""
    with engine.connect() as conn:
        row = conn.execute(
            select(TABLE.c.id, TABLE.c.owner, TABLE.c.started_at, TABLE.c.lease_until).where(
                TABLE.c.source == source, TABLE.c.finished_at.is_(None)
            )
        ).first()
    return None if row is None else dict(row._mapping)


def slot_taken(engine: Engine, source: str, scheduled_for: datetime) -> bool:
    """Whether the slot starting at ``scheduled_for`` has (or had) its run."""
    with engine.connect() as conn:
        found = conn.execute(
            select(TABLE.c.id).where(
                and_(TABLE.c.source == source, TABLE.c.scheduled_for == scheduled_for)
            )
        ).first()
    return found is not None
