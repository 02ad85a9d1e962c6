"""Retention: ``idemhook events prune`` deletes (or strips) claims and failures past their age.

Exactly-once holds only while a claim exists (docs/guarantees.md): keep claims
longer than the longest retry window of your providers (``LONGEST_RETRY_WINDOW``).
An asynchronous source's event still waiting for the worker (``received``) is
never pruned, however old: it is the queue, and its payload is what the worker runs.
Refused deliveries (``rejected_deliveries``) past the same age are deleted with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, func, select, update

from idemhook._store.queries import EVENTS, FAILURES, QueryError
from idemhook._store.refusals import prune_rejections


@dataclass(slots=True)
class PruneReport:
    """What a prune did (or, with ``dry_run``, would do)."""

    cutoff: datetime
    payloads_only: bool
    dry_run: bool
    events: int = 0
    failures: int = 0
    batches: int = 0
    #: Refused deliveries deleted (none with ``payloads_only``: they hold no payload).
    rejections: int = 0


def prune(
    engine: Engine,
    older_than: timedelta,
    *,
    payloads_only: bool = False,
    dry_run: bool = False,
    batch_size: int = 5000,
    now: datetime | None = None,
) -> PruneReport:
    """Delete (or strip the payloads of) rows older than ``older_than``, one batch per commit.

    Each batch is a short transaction over at most ``batch_size`` rows picked by
    the ``received_at``/``failed_at`` indexes, so a large prune never holds locks
    for long and concurrent intake keeps flowing between batches.
    """
    if batch_size < 1:
        raise QueryError("batch size must be at least 1")
    cutoff = (now or datetime.now(UTC)) - older_than
    report = PruneReport(cutoff, payloads_only, dry_run)
    targets = (
        (EVENTS, EVENTS.c.received_at, "events"),
        (FAILURES, FAILURES.c.failed_at, "failures"),
    )
    for table, at_column, counter in targets:
        old = at_column < cutoff
        if table is EVENTS:
            # A key in flight whose lease holds is being run now: its request stores its
            # answer in that row. (One whose lease ran out is an abandoned claim.)
            live = and_(
                EVENTS.c.status == "in_flight", EVENTS.c.locked_until > (now or datetime.now(UTC))
            )
            old = and_(old, ~live)
            # An asynchronous event still waiting for the worker is the queue itself.
            old = and_(old, EVENTS.c.status != "received")
        if payloads_only:
            old = and_(old, table.c.payload.is_not(None))
            changes: dict[str, Any] = {"payload": None, "headers": None}
            if table is FAILURES:
                # The raw body is the payload too (and what a retry replays).
                changes["raw_body"] = b""
        if dry_run:
            with engine.connect() as conn:
                count = conn.execute(select(func.count()).select_from(table).where(old)).scalar()
            setattr(report, counter, int(count or 0))
            continue
        while True:
            batch = select(table.c.id).where(old).limit(batch_size).scalar_subquery()
            if payloads_only:
                statement: Any = update(table).where(table.c.id.in_(batch)).values(changes)
            else:
                statement = delete(table).where(table.c.id.in_(batch))
            with engine.begin() as conn:
                done = conn.execute(statement).rowcount
            if not done:
                break
            setattr(report, counter, getattr(report, counter) + done)
            report.batches += 1
            if done < batch_size:
                break
    if not payloads_only:
        report.rejections = prune_rejections(engine, cutoff, batch_size=batch_size, dry_run=dry_run)
    return report
