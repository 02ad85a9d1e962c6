"""Reading the event and outbox tables: one implementation for the CLI and the read API.

Filters, keyset pagination and stats live here so that ``idemhook events ...``
and ``GET /events`` cannot disagree (pruning is :mod:`idemhook._engine.retention`, replay
:mod:`idemhook._engine.replay`, failure retry :mod:`idemhook._engine.failures`). Timestamps in
results are ISO 8601 strings in UTC; rows are plain dicts keyed by column name.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Select,
    and_,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.orm import Session

from idemhook._store.models import (
    delivery_failures,
    event_queue,
    outbox_messages,
    processed_events,
    reconcile_runs,
    rejected_deliveries,
)

# Re-exported: a query's callers catch queries.QueryError.
from idemhook._values.durations import QueryError as QueryError
from idemhook._values.durations import parse_duration as parse_duration
from idemhook._values.durations import parse_when as parse_when

EVENTS = processed_events
QUEUE = event_queue
FAILURES = delivery_failures
OUTBOX = outbox_messages
RUNS = reconcile_runs
REJECTIONS = rejected_deliveries

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: Longest retry window of the providers we document (Stripe and Close: 3 days).
LONGEST_RETRY_WINDOW = timedelta(days=3)


@dataclass(frozen=True, slots=True)
class Filters:
    """What a listing is narrowed to; ``None`` means any."""

    source: str | None = None
    type: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    #: Failures only: just those whose event has not been applied since.
    pending: bool = False
    #: Events of idempotency-key sources only: this client's keys.
    client: str | None = None


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- cursors ---------------------------------------------------------------------------------


def encode_cursor(at: datetime, row_id: int) -> str:
    """An opaque cursor naming the last row of a page (its sort key)."""
    raw = json.dumps([iso(at), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, row_id = json.loads(raw)
        if not isinstance(row_id, int) or isinstance(row_id, bool) or not 0 <= row_id < 2**63:
            raise TypeError(row_id)
        when = datetime.fromisoformat(at)
        return (when if when.tzinfo else when.replace(tzinfo=UTC)), row_id
    except (binascii.Error, ValueError, TypeError):
        raise QueryError(
            "The cursor is not one this server handed out; pass the 'next' value unchanged.",
            code="invalid_cursor",
        ) from None


def _page(
    session: Session,
    query: Select,
    at_column: Any,
    id_column: Any,
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    """Newest first by (at, id); one row more than asked tells whether a next page exists."""
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if cursor:
        at, row_id = decode_cursor(cursor)
        query = query.where(or_(at_column < at, and_(at_column == at, id_column < row_id)))
    rows = session.execute(
        query.order_by(at_column.desc(), id_column.desc()).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1]._mapping if rows and more else None
    next_cursor = encode_cursor(last[at_column.name], last[id_column.name]) if last else None
    return rows, next_cursor


# -- processed events ------------------------------------------------------------------------

#: Every column of processed_events, and when a waiting asynchronous event is due (from
#: ``event_queue``; null for every other event). Listings leave payload and headers out.
EVENT_COLUMNS = (*(c.name for c in EVENTS.columns), "next_attempt_at")
LIST_COLUMNS = tuple(name for name in EVENT_COLUMNS if name not in ("payload", "headers"))
#: processed_events with each waiting event's queue row.
_EVENTS_QUEUED = EVENTS.outerjoin(QUEUE, QUEUE.c.id == EVENTS.c.id)


def _event_column(name: str) -> Any:
    return QUEUE.c.next_attempt_at if name == "next_attempt_at" else EVENTS.c[name]


_TIMES = {
    "received_at",
    "processed_at",
    "last_seen_at",
    "replayed_at",
    "failed_at",
    # outbox_messages
    "next_attempt_at",
    "last_attempt_at",
    "created_at",
    "sent_at",
    "expires_at",
    "locked_until",
    # reconcile_runs
    "scheduled_for",
    "window_start",
    "window_end",
    "started_at",
    "finished_at",
    "lease_until",
}


def _row(mapping: Any, columns: tuple[str, ...]) -> dict[str, Any]:
    return {name: iso(mapping[name]) if name in _TIMES else mapping[name] for name in columns}


def _common_filters(query: Select, filters: Filters, table: Any, time_column: Any) -> Select:
    """Source, type and time window: the filters both tables share."""
    if filters.source is not None:
        query = query.where(table.c.source == filters.source)
    if filters.type is not None:
        query = query.where(table.c.event_type == filters.type)
    if filters.since is not None:
        query = query.where(time_column >= filters.since)
    if filters.until is not None:
        query = query.where(time_column < filters.until)
    return query


def _event_filters(query: Select, filters: Filters) -> Select:
    query = _common_filters(query, filters, EVENTS, EVENTS.c.received_at)
    if filters.status is not None:
        query = query.where(EVENTS.c.status == filters.status)
    if filters.client is not None:
        query = query.where(EVENTS.c.client == filters.client)
    return query


def event_id_of(event_id: str, client: str | None) -> str:
    """The stored ``event_id`` of a client's key (``acme:<key>``); ``event_id`` itself if none."""
    return event_id if client is None else f"{client}:{event_id}"


def list_events(
    session: Session, filters: Filters, limit: int = DEFAULT_LIMIT, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of events, newest first, and the cursor of the next page (or None)."""
    query = _event_filters(
        select(*(_event_column(name) for name in LIST_COLUMNS)).select_from(_EVENTS_QUEUED),
        filters,
    )
    rows, next_cursor = _page(session, query, EVENTS.c.received_at, EVENTS.c.id, limit, cursor)
    return [_row(r._mapping, LIST_COLUMNS) for r in rows], next_cursor


def get_event(session: Session, source: str, event_id: str) -> dict[str, Any] | None:
    """The whole row of one event with its failures (oldest first), or None."""
    row = session.execute(
        select(*(_event_column(name) for name in EVENT_COLUMNS))
        .select_from(_EVENTS_QUEUED)
        .where(EVENTS.c.source == source, EVENTS.c.event_id == event_id)
    ).first()
    if row is None:
        return None
    event = _row(row._mapping, EVENT_COLUMNS)
    event["failures"] = failures_of(session, source, event_id)
    return event


FAILURE_COLUMNS = (
    "id",
    "source",
    "event_id",
    "event_type",
    "error",
    "permanent",
    "failed_at",
)


def failures_of(session: Session, source: str, event_id: str) -> list[dict[str, Any]]:
    """Every recorded failure of one event, traceback included, oldest first."""
    rows = session.execute(
        select(*(FAILURES.c[n] for n in FAILURE_COLUMNS), FAILURES.c.traceback)
        .where(FAILURES.c.source == source, FAILURES.c.event_id == event_id)
        .order_by(FAILURES.c.failed_at, FAILURES.c.id)
    ).all()
    return [_row(r._mapping, (*FAILURE_COLUMNS, "traceback")) for r in rows]


# -- failures --------------------------------------------------------------------------------


#: Statuses of an event that is over and not failed: its failures are resolved.
RESOLVED_STATUSES = ("processed", "ignored", "rejected", "stale")


def applied_since_failure(failures: Any = FAILURES) -> Any:
    """SQL: the failed event has a claim row now.

    A failure rolls its claim back, and a delivery that finds a claim is a
    duplicate rather than a failure; so a claim row for a failed event can only
    come from a later delivery (or retry) that succeeded. An ``in_flight`` key
    is not applied yet; nor is an asynchronous source's event while the worker
    retries it (``received``) or after it gave up (``failed``).

    A scalar subquery, not ``EXISTS``: PostgreSQL may run an ``EXISTS`` as a hash
    of the whole of processed_events (a sequential scan of millions of rows to
    answer one page of failures); this one is one probe of the unique index per
    failure read.
    """
    return (
        select(EVENTS.c.id)
        .where(
            EVENTS.c.source == failures.c.source,
            EVENTS.c.event_id == failures.c.event_id,
            EVENTS.c.status.in_(RESOLVED_STATUSES),
        )
        .limit(1)
        .scalar_subquery()
        .is_not(None)
    )


def failure_filters(query: Select, filters: Filters) -> Select:
    query = _common_filters(query, filters, FAILURES, FAILURES.c.failed_at)
    if filters.pending:
        query = query.where(~applied_since_failure())
    return query


def list_failures(
    session: Session, filters: Filters, limit: int = DEFAULT_LIMIT, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of failures, newest first; ``resolved`` tells whether the event applied since."""
    resolved = applied_since_failure().label("resolved")
    query = failure_filters(select(*(FAILURES.c[n] for n in _SHOWN), resolved), filters)
    rows, next_cursor = _page(session, query, FAILURES.c.failed_at, FAILURES.c.id, limit, cursor)
    return [_row(r._mapping, (*_SHOWN, "resolved")) for r in rows], next_cursor


def get_failure(session: Session, failure_id: int) -> dict[str, Any] | None:
    """One failure by its ``id``, traceback and ``resolved`` included, or None."""
    resolved = applied_since_failure().label("resolved")
    row = session.execute(
        select(*(FAILURES.c[n] for n in _SHOWN), resolved).where(FAILURES.c.id == failure_id)
    ).first()
    return None if row is None else _row(row._mapping, (*_SHOWN, "resolved"))


#: A failure as listed and shown: its traceback is what an operator needs to act on it.
_SHOWN = (*FAILURE_COLUMNS, "traceback")


# -- stats -----------------------------------------------------------------------------------

STATS_BY = ("type", "source", "hour")


def _bucket(session: Session, table: Any, by: str, at_column: Any) -> Any:
    if by == "type":
        return func.coalesce(table.c.event_type, literal(""))
    if by == "source":
        return table.c.source
    if session.get_bind().dialect.name == "sqlite":
        return func.strftime("%Y-%m-%dT%H:00:00Z", at_column)
    return func.to_char(
        func.date_trunc("hour", func.timezone("UTC", at_column)), 'YYYY-MM-DD"T"HH24":00:00Z"'
    )


def stats(session: Session, filters: Filters, by: str = "type") -> dict[str, Any]:
    """Counts per group: events by status, duplicates received, failures recorded."""
    if by not in STATS_BY:
        raise QueryError(f"by must be one of {', '.join(STATS_BY)}, got {by!r}")
    key = _bucket(session, EVENTS, by, EVENTS.c.received_at).label("key")
    event_rows = session.execute(
        _event_filters(
            select(
                key,
                EVENTS.c.status,
                func.count().label("events"),
                func.coalesce(func.sum(EVENTS.c.duplicate_count), 0).label("duplicates"),
            ),
            filters,
        ).group_by(key, EVENTS.c.status)
    ).all()
    fkey = _bucket(session, FAILURES, by, FAILURES.c.failed_at).label("key")
    window = Filters(
        source=filters.source, type=filters.type, since=filters.since, until=filters.until
    )
    failure_rows = session.execute(
        failure_filters(select(fkey, func.count().label("failures")), window).group_by(fkey)
    ).all()

    groups: dict[str, dict[str, Any]] = {}

    def group(name: str) -> dict[str, Any]:
        return groups.setdefault(
            name, {"key": name, "events": 0, "by_status": {}, "duplicates": 0, "failures": 0}
        )

    for row in event_rows:
        entry = group(row.key)
        entry["events"] += row.events
        entry["duplicates"] += int(row.duplicates)
        entry["by_status"][row.status] = row.events
    for row in failure_rows:
        group(row.key)["failures"] += row.failures
    ordered = sorted(groups.values(), key=lambda g: g["key"], reverse=by == "hour")
    by_status: dict[str, int] = {}
    for g in ordered:
        for status, count in g["by_status"].items():
            by_status[status] = by_status.get(status, 0) + count
    totals = {
        "events": sum(g["events"] for g in ordered),
        "by_status": by_status,
        "duplicates": sum(g["duplicates"] for g in ordered),
        "failures": sum(g["failures"] for g in ordered),
    }
    return {
        "by": by,
        "since": iso(filters.since),
        "until": iso(filters.until),
        "groups": ordered,
        "totals": totals,
    }


# -- object versions -------------------------------------------------------------------------


def object_view(found: dict[str, Any]) -> dict[str, Any]:
    """An object's version (:func:`idemhook._store.object_versions.show`) as the CLI and the read
    API print it: versions as exact decimal text (a JSON number would round a long
    fraction through a float on many readers), times in ISO 8601."""
    shown = dict(found)
    shown["version"] = _exact(found["version"])
    shown["applied_at"] = iso(found["applied_at"])
    floor = found["floor"]
    if floor is not None:
        shown["floor"] = {
            "version": _exact(floor["version"]),
            "event_id": floor["event_id"],
            "pruned_at": iso(floor["pruned_at"]),
        }
    return shown


def _exact(version: Any) -> str | None:
    return None if version is None else format(version, "f")


# -- outbox messages -------------------------------------------------------------------------

#: Every column of outbox_messages; listings leave payload and result out (``show`` has them).
OUTBOX_COLUMNS = tuple(c.name for c in OUTBOX.columns)
OUTBOX_LIST_COLUMNS = tuple(n for n in OUTBOX_COLUMNS if n not in ("payload", "result"))


@dataclass(frozen=True, slots=True)
class OutboxFilters:
    """What an outbox listing is narrowed to; ``None`` means any. Times are ``created_at``."""

    kind: str | None = None
    status: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def list_outbox(
    session: Session,
    filters: OutboxFilters,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of outbox messages, newest first, and the cursor of the next page (or None)."""
    query = select(*(OUTBOX.c[name] for name in OUTBOX_LIST_COLUMNS))
    for column, value in (
        (OUTBOX.c.kind, filters.kind),
        (OUTBOX.c.status, filters.status),
        (OUTBOX.c.source, filters.source),
    ):
        if value is not None:
            query = query.where(column == value)
    if filters.since is not None:
        query = query.where(OUTBOX.c.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(OUTBOX.c.created_at < filters.until)
    rows, next_cursor = _page(session, query, OUTBOX.c.created_at, OUTBOX.c.id, limit, cursor)
    return [_row(r._mapping, OUTBOX_LIST_COLUMNS) for r in rows], next_cursor


def get_message(session: Session, message_id: int) -> dict[str, Any] | None:
    """Every column of one outbox message, or None."""
    row = session.execute(select(OUTBOX).where(OUTBOX.c.id == message_id)).first()
    return None if row is None else _row(row._mapping, OUTBOX_COLUMNS)


# -- reconcile runs ----------------------------------------------------------------------------

RUN_COLUMNS = tuple(c.name for c in RUNS.columns)


def list_runs(
    session: Session,
    source: str | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of reconcile runs, newest first (of ``source``, or all), and the next cursor."""
    query = select(*RUNS.c)
    if source is not None:
        query = query.where(RUNS.c.source == source)
    rows, next_cursor = _page(session, query, RUNS.c.started_at, RUNS.c.id, limit, cursor)
    return [_row(r._mapping, RUN_COLUMNS) for r in rows], next_cursor


def reconcile_summary(
    session: Session, sources: list[str], now: datetime | None = None
) -> list[dict[str, Any]]:
    """Per source: its last run, events recovered in the last 24 hours, its last error and
    last success. Read through the ``(source, started_at, id)`` index."""
    now = now or datetime.now(UTC)
    newest = (RUNS.c.started_at.desc(), RUNS.c.id.desc())
    shown = [
        RUNS.c[name]
        for name in (
            "id",
            "started_at",
            "finished_at",
            "outcome",
            "seen",
            "already",
            "recovered",
            "failed",
            "error",
        )
    ]
    names = tuple(c.name for c in shown)
    known = set(sources) | set(session.execute(select(RUNS.c.source).distinct()).scalars().all())
    summary = []
    for source in sorted(known):
        mine = RUNS.c.source == source
        last = session.execute(select(*shown).where(mine).order_by(*newest).limit(1)).first()
        recovered = session.execute(
            select(func.coalesce(func.sum(RUNS.c.recovered), 0)).where(
                mine, RUNS.c.started_at >= now - timedelta(hours=24)
            )
        ).scalar()
        error = session.execute(
            select(RUNS.c.started_at, RUNS.c.error)
            .where(mine, RUNS.c.error.is_not(None))
            .order_by(*newest)
            .limit(1)
        ).first()
        success = session.execute(
            select(RUNS.c.finished_at)
            .where(mine, RUNS.c.outcome == "succeeded")
            .order_by(*newest)
            .limit(1)
        ).scalar()
        summary.append(
            {
                "source": source,
                "configured": source in sources,
                "last_run": None if last is None else _row(last._mapping, names),
                "recovered_24h": int(recovered or 0),
                "last_error": None if error is None else error.error,
                "last_error_at": None if error is None else iso(error.started_at),
                "last_success_at": iso(success),
            }
        )
    return summary


# -- refused deliveries ------------------------------------------------------------------------

#: What a listing shows of a refusal: every column but the cap's bookkeeping (minute, slot).
REJECTION_COLUMNS = tuple(c.name for c in REJECTIONS.columns if c.name not in ("minute", "slot"))


def list_rejections(
    session: Session,
    filters: Filters,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of refused deliveries, newest first, and the next cursor (or None).

    Filters: ``source``, ``since``, ``until``, and ``type`` read as the error code. A row
    with ``count`` above 1 stands for that many refusals (the minute's last row past the
    cap, docs/operations.md#refused-deliveries).
    """
    query = select(*(REJECTIONS.c[name] for name in REJECTION_COLUMNS))
    if filters.source is not None:
        query = query.where(REJECTIONS.c.source == filters.source)
    if filters.type is not None:
        query = query.where(REJECTIONS.c.error == filters.type)
    if filters.since is not None:
        query = query.where(REJECTIONS.c.received_at >= filters.since)
    if filters.until is not None:
        query = query.where(REJECTIONS.c.received_at < filters.until)
    rows, next_cursor = _page(
        session, query, REJECTIONS.c.received_at, REJECTIONS.c.id, limit, cursor
    )
    return [_row(r._mapping, REJECTION_COLUMNS) for r in rows], next_cursor


def rejection_counts(
    session: Session, since: datetime, source: str | None = None
) -> dict[str, dict[str, int]]:
    """Refusals received since ``since``, per source and error code (``count`` summed)."""
    query = (
        select(REJECTIONS.c.source, REJECTIONS.c.error, func.sum(REJECTIONS.c.count))
        .where(REJECTIONS.c.received_at >= since)
        .group_by(REJECTIONS.c.source, REJECTIONS.c.error)
    )
    if source is not None:
        query = query.where(REJECTIONS.c.source == source)
    counts: dict[str, dict[str, int]] = {}
    for name, error, total in session.execute(query):
        counts.setdefault(name, {})[error] = int(total or 0)
    return counts
