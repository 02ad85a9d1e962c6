"""The overview's figures: the last 24 hours per source, per hour, and what is waiting.

Every figure is read through an index and bounded (:mod:`idemhook._web.dashboard.counts`):

- **Events and duplicates per hour**: for each of the 24 hours, the newest
  :data:`SAMPLE` + 1 events of that hour (a backward range read of the
  ``(received_at, id)`` index). An hour with no more than :data:`SAMPLE` events
  is counted exactly. A busier hour's count is the planner's estimate for that
  hour's range (one ``EXPLAIN`` for all 24 hours), and its split by source and its
  duplicates are scaled from the sample: marked "≈" on the page.
- **Duplicates** are the ``duplicate_count`` of the events received in the window
  (their retries, which mostly arrive within minutes of the first delivery); the
  rate is duplicates / (events + duplicates), the share of deliveries that were
  duplicates.
- **Unresolved failures**: those among the newest :data:`UNRESOLVED_SCAN` failures
  whose event has not been applied since; "≥" when there are older failures still.
- **Ignored, rejected, stale** (and, with asynchronous sources, **pending**) come from the
  partial index of events whose status is not ``processed``, which carries the
  source: exact while the window holds at most :data:`STATUS_SCAN` of them, the
  planner's estimate per source past that. **Failed attempts** come from
  ``delivery_failures``' ``(failed_at, id)`` index, exact up to
  :data:`~idemhook._web.dashboard.counts.CAP`.
- **The outbox**: pending and dead messages and the oldest pending one's age, from
  their partial indexes (:func:`idemhook._web.dashboard.outbox.summary`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    Integer,
    and_,
    bindparam,
    func,
    literal_column,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from idemhook._store.models import EVENT_STATUSES, delivery_failures, processed_events
from idemhook._store.queries import applied_since_failure
from idemhook._web.dashboard import outbox
from idemhook._web.dashboard.counts import CAP, Count, bounded_count, estimate, estimate_each

EVENTS = processed_events
FAILURES = delivery_failures
HOUR = timedelta(hours=1)
HOURS = 24
#: Events read per hour; an hour with more is estimated.
SAMPLE = 1_000
#: Entries of the not-processed index read to count one status per source exactly (an
#: index-only read: the index carries the source).
STATUS_SCAN = 50_000
#: Newest failures checked for "applied since" (one unique-index probe each).
UNRESOLVED_SCAN = 2_000
#: The status of events received by an asynchronous source and not yet applied (issue 14).
PENDING_STATUS = "received"


def async_queues() -> bool:
    """Whether events can wait in ``processed_events`` (the asynchronous mode's status)."""
    return PENDING_STATUS in EVENT_STATUSES


@dataclass
class Hour:
    start: datetime
    events: Count
    duplicates: Count


@dataclass
class SourceFigures:
    name: str
    configured: bool = True
    events: Count = field(default_factory=lambda: Count(0))
    duplicates: Count = field(default_factory=lambda: Count(0))
    ignored: Count = field(default_factory=lambda: Count(0))
    rejected: Count = field(default_factory=lambda: Count(0))
    stale: Count = field(default_factory=lambda: Count(0))
    failures: Count = field(default_factory=lambda: Count(0))
    pending: Count | None = None
    oldest_pending: datetime | None = None
    url: str = ""
    #: True: no public URL is configured; ``url`` is how this request reached the server.
    url_guessed: bool = False

    @property
    def duplicate_rate(self) -> float | None:
        deliveries = self.events.value + self.duplicates.value
        return self.duplicates.value / deliveries if deliveries else None

    @property
    def rate_exact(self) -> bool:
        return self.events.exact and self.duplicates.exact


@dataclass
class Overview:
    since: datetime
    until: datetime
    hours: list[Hour]
    sources: list[SourceFigures]
    unresolved_failures: Count
    async_queues: bool
    outbox: outbox.Summary

    @property
    def estimated(self) -> bool:
        return any(not h.events.exact for h in self.hours) or any(
            not c.exact
            for s in self.sources
            for c in (s.events, s.ignored, s.rejected, s.stale, s.failures)
        )

    @property
    def totals(self) -> SourceFigures:
        total = SourceFigures("all sources")
        for s in self.sources:
            total.events += s.events
            total.duplicates += s.duplicates
            total.ignored += s.ignored
            total.rejected += s.rejected
            total.stale += s.stale
            total.failures += s.failures
        return total


def hour_starts(now: datetime) -> list[datetime]:
    """The 24 hourly buckets ending with the current hour (UTC, on the hour)."""
    current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return [current - HOUR * (HOURS - 1 - i) for i in range(HOURS)]


def build(session: Session, configured: list[str], now: datetime | None = None) -> Overview:
    now = now or datetime.now(UTC)
    starts = hour_starts(now)
    since = starts[0]
    per_source: dict[str, SourceFigures] = {name: SourceFigures(name) for name in configured}

    def figures(name: str) -> SourceFigures:
        if name not in per_source:
            per_source[name] = SourceFigures(name, configured=False)
        return per_source[name]

    hours = _hours(session, starts, figures)
    for status, attribute in (("ignored", "ignored"), ("rejected", "rejected"), ("stale", "stale")):
        counted = _by_source(
            session,
            select(EVENTS.c.source).where(EVENTS.c.status == status, EVENTS.c.received_at >= since),
            EVENTS.c.source,
            list(per_source),
            scan=STATUS_SCAN,
        )
        for name, count in counted.items():
            setattr(figures(name), attribute, count)
    failed = _by_source(
        session,
        select(FAILURES.c.source).where(
            FAILURES.c.failed_at >= since, FAILURES.c.permanent.is_(False)
        ),
        FAILURES.c.source,
        list(per_source),
    )
    for name, count in failed.items():
        figures(name).failures = count
    queues = async_queues()
    if queues:
        for entry in per_source.values():
            _pending(session, entry)
    unresolved = _unresolved(session)
    ordered = sorted(per_source.values(), key=lambda s: (not s.configured, s.name))
    return Overview(
        since=since,
        until=now,
        hours=hours,
        sources=ordered,
        unresolved_failures=unresolved,
        async_queues=queues,
        outbox=outbox.summary(session),
    )


def _hours(session: Session, starts: list[datetime], figures: Any) -> list[Hour]:
    """Events and duplicates per hour and per source, exact or scaled from each hour's sample."""
    params: dict[str, Any] = {"sample": SAMPLE + 1}
    for i, start in enumerate(starts):
        params[f"start{i}"], params[f"end{i}"] = start, start + HOUR
    rows: dict[int, list[Any]] = {}
    for row in session.execute(_hourly_samples(), params).all():
        rows.setdefault(row.bucket, []).append(row)
    seen = [sum(r.n for r in rows.get(i, [])) for i in range(len(starts))]
    guesses = (
        estimate_each(session, _hourly_ranges(), params) if any(n > SAMPLE for n in seen) else None
    )
    hours = []
    for i, start in enumerate(starts):
        if seen[i] <= SAMPLE:
            scale, exact, at_least = 1.0, True, False
            total = seen[i]
        else:
            at_least = guesses is None
            total = max(guesses[i] if guesses else 0, seen[i])
            scale, exact = total / seen[i], False
        duplicates = 0.0
        for r in rows.get(i, []):
            entry = figures(r.source)
            entry.events += Count(round(r.n * scale), exact, at_least)
            entry.duplicates += Count(round(int(r.dups) * scale), exact, at_least)
            duplicates += int(r.dups) * scale
        hours.append(Hour(start, Count(total, exact, at_least), Count(round(duplicates), exact)))
    return hours


def _hour(i: int) -> Any:
    received = EVENTS.c.received_at
    return and_(received >= bindparam(f"start{i}"), received < bindparam(f"end{i}"))


@functools.cache
def _hourly_samples() -> CompoundSelect:
    """Per hour and source: the count and duplicates of the hour's newest ``sample`` events.

    Built once with bound parameters (the hours, the sample size), so that each page
    only binds values to a statement SQLAlchemy has compiled already.
    """
    parts = []
    for i in range(HOURS):
        sample = (
            select(EVENTS.c.source, EVENTS.c.duplicate_count)
            .where(_hour(i))
            .order_by(EVENTS.c.received_at.desc(), EVENTS.c.id.desc())
            .limit(bindparam("sample", type_=Integer))
            .subquery()
        )
        parts.append(
            select(
                literal_column(str(i)).label("bucket"),
                sample.c.source,
                func.count().label("n"),
                func.coalesce(func.sum(sample.c.duplicate_count), 0).label("dups"),
            ).group_by(sample.c.source)
        )
    return union_all(*parts)


@functools.cache
def _hourly_ranges() -> CompoundSelect:
    """Every event of each hour, one query per hour: only ever EXPLAINed, for its estimates."""
    return union_all(*(select(EVENTS.c.id).where(_hour(i)) for i in range(HOURS)))


def _by_source(
    session: Session, query: Any, source_column: Any, names: list[str], scan: int = CAP
) -> dict[str, Count]:
    """Rows of ``query`` per source, from at most ``scan`` + 1 of them.

    While there are no more, each source's count is exact (one read of the index
    range, grouped); past that each is the planner's estimate for that source.
    """
    sample = query.limit(scan + 1).subquery()
    found = {
        row.source: row.n
        for row in session.execute(
            select(sample.c.source, func.count().label("n")).group_by(sample.c.source)
        ).all()
    }
    if sum(found.values()) <= scan:
        return {name: Count(n) for name, n in found.items()}
    counts = {}
    for name in sorted(set(found) | set(names)):
        guess = estimate(session, query.where(source_column == name))
        counts[name] = (
            Count(found.get(name, 0), exact=False, at_least=True)
            if guess is None
            else Count(max(guess, found.get(name, 0)), exact=False)
        )
    return counts


def _pending(session: Session, entry: SourceFigures) -> None:
    waiting = select(EVENTS.c.id).where(
        EVENTS.c.status == PENDING_STATUS, EVENTS.c.source == entry.name
    )
    entry.pending = bounded_count(session, waiting)
    if entry.pending.value:
        entry.oldest_pending = session.execute(
            select(func.min(EVENTS.c.received_at)).where(
                EVENTS.c.status == PENDING_STATUS, EVENTS.c.source == entry.name
            )
        ).scalar()


def _unresolved(session: Session) -> Count:
    """Failures not applied since, among the newest ones (a lower bound when there are more)."""
    newest = (
        select(FAILURES.c.id, FAILURES.c.source, FAILURES.c.event_id)
        .order_by(FAILURES.c.failed_at.desc(), FAILURES.c.id.desc())
        .limit(UNRESOLVED_SCAN + 1)
        .subquery()
    )
    read, unresolved = session.execute(
        select(
            func.count(),
            func.count().filter(~applied_since_failure(newest)),
        ).select_from(newest)
    ).one()
    if read <= UNRESOLVED_SCAN:
        return Count(unresolved)
    return Count(unresolved, exact=False, at_least=True)
