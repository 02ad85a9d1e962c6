"""``delivery_failures``: recording a failed attempt, and retrying failed events.

A synchronous claim's failure row is written in a transaction of its own, after
the claim's transaction has ended (rolled back, or committed with a rejection),
so it survives whatever happened to the claim: on the attempt's own lane
(:func:`write`), so recording a failure never waits for a connection of the
request pool, which handlers that overran may hold. A handler that overran is
recorded by the request thread on a reserved connection of its own
(:attr:`idemhook._store.database.Database.reserve`). ``idemhook worker`` commits a failed attempt
(its count and its backoff), so it writes the attempt's row in that same
transaction (:mod:`idemhook._engine.applier`).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.datastructures import Headers

from idemhook._config.events import events_of, for_tenant
from idemhook._config.freshness import versions_of
from idemhook._config.sources import Source
from idemhook._contract import (
    Event,
)
from idemhook._engine.dispatch import HandlerRun
from idemhook._store.lanes import Lane
from idemhook._store.models import delivery_failures, event_queue, processed_events
from idemhook._store.notify import EVENTS_CHANNEL
from idemhook._store.queries import Filters, failure_filters
from idemhook._values.errors import BadRequest
from idemhook._values.headers import safe_headers
from idemhook._values.outcome import Status

log = logging.getLogger("idemhook.claim")


def failure_row(
    event: Event, *, error: str, cause: BaseException, raw_body: bytes, permanent: bool
) -> dict[str, Any]:
    """The ``delivery_failures`` row of one failed (or rejected) attempt at ``event``."""
    return {
        "source": event.source,
        "event_id": event.id,
        "event_type": event.type,
        "error": error[:4000],
        "traceback": "".join(traceback.format_exception(cause))[-20000:],
        "raw_body": raw_body,
        "payload": event.payload,
        "headers": safe_headers(event.headers),
        "permanent": permanent,
        "failed_at": datetime.now(UTC),
        "tenant": event.tenant,
    }


def failure_of(event: Event, run: HandlerRun, raw_body: bytes) -> dict[str, Any]:
    """The ``delivery_failures`` row of a failed or rejected run of ``event``'s handlers."""
    if run.error is None:  # pragma: no cover (failed and rejected runs carry their error)
        raise ValueError("a failed handler run without its error")
    return failure_row(
        event,
        error=run.error_text,
        cause=run.error,
        raw_body=raw_body,
        permanent=run.status is Status.REJECTED,
    )


def write(lane: Lane, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` on ``lane`` in a transaction of their own (the attempt's has ended).

    As :func:`record`: a database error is logged, never raised.
    """
    if not rows:
        return
    try:
        lane.begin()
        lane.joined().execute(insert(delivery_failures), rows)
        lane.commit()
    except SQLAlchemyError as exc:
        lane.rollback()
        log.warning("could not record %d delivery failure(s): %s", len(rows), type(exc).__name__)


def record(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` in a transaction of their own.

    Losing a failure row must never change the answer: the event's own
    outcome is already decided. A database error is logged, not raised.
    """
    if not rows:
        return
    try:
        with engine.begin() as conn:
            conn.execute(insert(delivery_failures), rows)
    except SQLAlchemyError as exc:
        log.warning("could not record %d delivery failure(s): %s", len(rows), type(exc).__name__)


# -- retry -----------------------------------------------------------------------------------


class ActionRefused(Exception):
    """Replay or retry cannot run for this event; the message says why."""


@dataclass(frozen=True, slots=True)
class RetryResult:
    """The outcome of retrying one failed event: a claim outcome or why it was skipped."""

    source: str
    event_id: str
    status: str
    detail: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "event_id": self.event_id,
            "status": self.status,
            "detail": self.detail,
        }


def retry_failure(
    claimer: Any, sources: dict[str, Source], source: str, event_id: str
) -> RetryResult:
    """Re-run the latest failed delivery of an event through the live claim.

    The stored raw body and headers are parsed exactly as on receipt (the
    signature was verified then and is not stored, so it is not checked again),
    and the event goes through :meth:`idemhook._engine.claim.Claimer.apply` like a delivery.
    An event that has been applied since is skipped: claiming it again would only
    count a duplicate. An asynchronous source's event (``received``, waiting for a
    backoff, or ``failed``) is handed back to ``idemhook worker`` instead: see
    :func:`requeue`.
    """
    failures, events = delivery_failures, processed_events
    api = sources.get(source)
    if api is not None and api.scheme.operation:
        # Checked first: a named client's failures are stored as `<client>:<key>`, so the
        # key alone would find none and say so, which misleads.
        raise ActionRefused(
            f"source {source!r} is an API (idempotency-key): its client retries with the same "
            "key, and only that retry can receive the answer; the failure is resolved when "
            "that retry succeeds"
        )
    with claimer.database.session() as session:
        failure = session.execute(
            select(failures.c.raw_body, failures.c.headers, failures.c.failed_at, failures.c.tenant)
            .where(failures.c.source == source, failures.c.event_id == event_id)
            .order_by(failures.c.failed_at.desc(), failures.c.id.desc())
            .limit(1)
        ).first()
        if failure is None:
            raise ActionRefused(f"no recorded failure of event {event_id!r} from {source!r}")
        applied = session.execute(
            select(events.c.status).where(events.c.source == source, events.c.event_id == event_id)
        ).scalar()
    if applied in (Status.RECEIVED, Status.FAILED):
        return requeue(claimer.database.engine, source, event_id)
    if applied is not None:
        return RetryResult(source, event_id, "skipped", f"already recorded as {applied}")
    src = sources.get(source)
    if src is None:
        raise ActionRefused(f"source {source!r} is no longer configured")
    raw_body = bytes(failure.raw_body)
    if not raw_body:
        raise ActionRefused(f"the raw body of {event_id!r} was pruned (--payloads-only)")
    headers = Headers(failure.headers or {})
    parsed = events_of(src, src.scheme.parse(raw_body), headers, datetime.now(UTC))
    if failure.tenant is not None:  # a tenant's event: its ID scoped as on receipt
        parsed = [for_tenant(e, failure.tenant) for e in parsed]
    found = [e for e in parsed if e.id == event_id]
    if not found:
        raise ActionRefused(f"the stored body no longer yields event {event_id!r}")
    versions = None
    if src.freshness is not None:  # checked like a delivery: stale if its object moved on
        try:
            versions = versions_of(src.freshness, found[:1])
        except BadRequest as exc:
            raise ActionRefused(
                f"the stored body no longer yields the object and version of {event_id!r} "
                f"({exc.message})"
            ) from None
    outcome = claimer.apply(
        found[:1],
        raw_body,
        versions,
        lock_objects=src.batch is not None,
        body_is_payload=src.batch is None and src.scheme.parses_json,
    )[0]
    detail = outcome.error if outcome.status == "failed" else outcome.result
    return RetryResult(source, event_id, str(outcome.status), detail)


def requeue(engine: Engine, source: str, event_id: str) -> RetryResult:
    """Make an asynchronous event due now with a fresh set of attempts (docs/async.md).

    (And of interruptions: an event given up on because workers kept dying with it
    runs again, presumably once what killed them is mended.)

    For a ``failed`` event (every allowed attempt failed) or one waiting for its
    next attempt. ``idemhook worker`` applies it like a new one (workers are
    notified); for a source with ``order_key``, it is again its key's head if later
    events of the key still wait, so it goes first. An event a worker is applying
    right now is left alone.
    """
    events, queue = processed_events, event_queue
    key = (events.c.source == source, events.c.event_id == event_id)
    with engine.begin() as conn:
        row = conn.execute(
            select(events.c.id, events.c.status, events.c.order_key, events.c.received_at)
            .where(*key)
            .with_for_update()
        ).first()
        if row is None or row.status not in (Status.RECEIVED, Status.FAILED):
            found = "deleted" if row is None else f"recorded as {row.status}"
            return RetryResult(source, event_id, "skipped", f"already {found}")
        # The clock the ack and the worker use: PostgreSQL's own (the demo's: ours).
        now = func.now() if conn.dialect.name == "postgresql" else datetime.now(UTC)
        if row.status == Status.RECEIVED:
            queued = conn.execute(
                select(queue.c.id).where(queue.c.id == row.id).with_for_update(skip_locked=True)
            ).first()
            if queued is None:
                return RetryResult(source, event_id, "skipped", "a worker is applying it right now")
            conn.execute(update(queue).where(queue.c.id == row.id).values(next_attempt_at=now))
        else:
            conn.execute(
                insert(queue).values(
                    id=row.id,
                    source=source,
                    order_key=row.order_key,
                    next_attempt_at=now,
                    received_at=row.received_at,
                )
            )
        conn.execute(
            update(events)
            .where(events.c.id == row.id)
            .values(status=str(Status.RECEIVED), attempts=0, interruptions=0, result=None)
        )
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_notify(EVENTS_CHANNEL, "")))
    return RetryResult(
        source, event_id, "accepted", f"due now for idemhook worker (was {row.status})"
    )


def pending_failures(session: Session, filters: Filters) -> Iterator[tuple[str, str]]:
    """Distinct (source, event_id) of failures not applied since, oldest first."""
    failures = delivery_failures
    pending = Filters(
        source=filters.source,
        type=filters.type,
        since=filters.since,
        until=filters.until,
        pending=True,
    )
    first_failed = func.min(failures.c.failed_at)
    query = failure_filters(select(failures.c.source, failures.c.event_id), pending).group_by(
        failures.c.source, failures.c.event_id
    )
    for row in session.execute(query.order_by(first_failed)).all():
        yield row.source, row.event_id
