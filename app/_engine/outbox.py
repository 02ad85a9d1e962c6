"""The transactional outbox: messages added in a claim's transaction, and what operators do to them.

A handler calls ``event.outbox.add(kind, payload, key=None)``; the message is
inserted through the handler's own session, so it commits with the claim or
not at all, and a ``NOTIFY`` sent in the same transaction wakes the workers
when (and only if) it commits. ``idemhook worker`` delivers it
(:mod:`idemhook._engine.sender`); ``idemhook outbox retry`` and ``prune`` are here too.
Reading the table is :mod:`idemhook._store.queries`. The contract: docs/outbox.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, select, update
from sqlalchemy.orm import Session

from idemhook._contract import Event, current_outbox
from idemhook._store.engine import aware
from idemhook._store.models import outbox_messages
from idemhook._store.notify import OUTBOX_CHANNEL
from idemhook._store.outbox import ADD_PG, EXISTING, NOTIFY
from idemhook._values.jsontext import (
    dumps,
)
from idemhook._values.outbox_status import MessageStatus

TABLE = outbox_messages
MAX_KEY_LENGTH = 512
_KIND = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise TypeError(
            f"outbox kind {kind!r}: 1-64 letters, digits, '.', '_' or '-' (e.g. \"email\")"
        )
    return kind


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or "\x00" in key:
        raise TypeError(
            f"outbox key: a non-empty string of at most {MAX_KEY_LENGTH} characters, "
            f"without NUL (got {type(key).__name__})"
        )
    return key


class Outbox:
    """``event.outbox``: adds messages in the transaction of the event's claim."""

    __slots__ = ("event", "session", "senders", "position")

    def __init__(self, event: Event, session: Session, senders: Mapping[str, Any] | None) -> None:
        self.event = event
        self.session = session
        self.senders = senders
        #: Messages added so far by this event's handlers: the next default key's position.
        self.position = 0

    def add(self, kind: str, payload: Any = None, key: str | None = None) -> int:
        """Insert a message for the sender of ``kind``; return its ``id``.

        ``key`` defaults to ``<source>:<event id>:<position>`` (the position of this
        call among the event's ``add`` calls), which is the same every time the
        event's handlers run. A message whose kind and key already exist is not
        added again: its ``id`` is returned.
        """
        check_kind(kind)
        if self.senders is not None and kind not in self.senders:
            known = ", ".join(sorted(self.senders)) or "none"
            raise LookupError(
                f"no @sender is registered for outbox kind {kind!r} (registered: {known})"
            )
        position, self.position = self.position, self.position + 1
        if key is None:
            key = f"{self.event.source}:{self.event.id}:{position}"
        return add_message(
            self.session,
            kind,
            payload,
            check_key(key),
            source=self.event.source,
            event_id=self.event.id,
        )


def bind(event: Event, session: Session, senders: Mapping[str, Any] | None) -> Token:
    """Make ``event.outbox`` usable while ``event``'s handlers run in ``session``.

    (A token, not a context manager: this runs once per event on the claim's hot path.)
    """
    return current_outbox.set(Outbox(event, session, senders))


def unbind(token: Token) -> None:
    current_outbox.reset(token)


def add_message(
    session: Session | Connection,
    kind: str,
    payload: Any,
    key: str,
    *,
    source: str | None = None,
    event_id: str | None = None,
) -> int:
    """Insert one message in ``session``'s transaction (idempotent on ``(kind, key)``)."""
    stored = dumps(payload, strict=True)
    bind = session.get_bind() if isinstance(session, Session) else session
    if bind.dialect.name == "postgresql":
        params = {
            "kind": kind,
            "key": key,
            "payload": stored,
            "source": source,
            "event_id": event_id,
            "channel": OUTBOX_CHANNEL,
        }
        found = session.execute(ADD_PG, params).scalar()
    else:
        from sqlalchemy.dialects.sqlite import insert

        now = datetime.now(UTC)
        statement = (
            insert(TABLE)
            .values(
                kind=kind,
                key=key,
                payload=payload,
                status=str(MessageStatus.PENDING),
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                source=source,
                event_id=event_id,
            )
            .on_conflict_do_nothing(index_elements=["kind", "key"])
            .returning(TABLE.c.id)
        )
        found = session.execute(statement).scalar()
    if found is None:  # added before (this key, an earlier run or another delivery)
        found = session.execute(EXISTING, {"kind": kind, "key": key}).scalar_one()
    return int(found)


# -- operating it ----------------------------------------------------------------------------


class OutboxRefused(ValueError):
    """An operator action that cannot apply to a message as it is (said in one line)."""


@dataclass(frozen=True, slots=True)
class RetryResult:
    id: int
    status: str  # "retrying", or "refused"
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "detail": self.detail}


def notify(conn: Connection, kind: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(NOTIFY, {"channel": OUTBOX_CHANNEL, "kind": kind})


def retry(engine: Engine, ids: Sequence[int]) -> list[RetryResult]:
    """Make dead messages (or pending ones waiting for a backoff) due now, with fresh attempts.

    A ``sent`` message is refused (it was delivered), and so is one a worker
    holds right now (its lease has not expired).
    """
    results = []
    for message_id in ids:
        with engine.begin() as conn:
            query = select(TABLE.c.status, TABLE.c.kind, TABLE.c.leased_by, TABLE.c.next_attempt_at)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query.where(TABLE.c.id == message_id)).first()
            if row is None:
                results.append(RetryResult(message_id, "refused", "no such message (or pruned)"))
                continue
            if row.status == MessageStatus.SENT:
                results.append(RetryResult(message_id, "refused", "already sent"))
                continue
            now = _db_now(conn)
            if row.leased_by is not None and aware(row.next_attempt_at) > now:
                results.append(
                    RetryResult(
                        message_id, "refused", f"a worker is sending it now ({row.leased_by})"
                    )
                )
                continue
            conn.execute(
                update(TABLE)
                .where(TABLE.c.id == message_id)
                .values(
                    status=str(MessageStatus.PENDING),
                    attempts=0,
                    next_attempt_at=now,
                    leased_by=None,
                )
            )
            notify(conn, row.kind)
            was = "dead" if row.status == MessageStatus.DEAD else "waiting for its next attempt"
            results.append(RetryResult(message_id, "retrying", f"was {was}; due now"))
    return results


def dead_ids(engine: Engine, kind: str | None = None) -> list[int]:
    """Every dead message's id (of ``kind``), oldest first."""
    query = select(TABLE.c.id).where(TABLE.c.status == str(MessageStatus.DEAD))
    if kind is not None:
        query = query.where(TABLE.c.kind == kind)
    with engine.connect() as conn:
        return list(conn.execute(query.order_by(TABLE.c.id)).scalars())


@dataclass(slots=True)
class PruneReport:
    cutoff: datetime
    dry_run: bool
    sent: int = 0
    dead: int = 0
    batches: int = 0


def prune(
    engine: Engine,
    older_than: timedelta,
    *,
    include_dead: bool = False,
    dry_run: bool = False,
    batch_size: int = 5000,
    now: datetime | None = None,
) -> PruneReport:
    """Delete sent (and, with ``include_dead``, dead) messages created before the cutoff.

    Pending messages are never pruned. One short transaction per batch, as
    ``events prune`` does.
    """
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    cutoff = (now or datetime.now(UTC)) - older_than
    report = PruneReport(cutoff, dry_run)
    statuses = [MessageStatus.SENT] + ([MessageStatus.DEAD] if include_dead else [])
    for status in statuses:
        old = and_(TABLE.c.status == str(status), TABLE.c.created_at < cutoff)
        if dry_run:
            with engine.connect() as conn:
                count = conn.execute(select(func.count()).select_from(TABLE).where(old)).scalar()
            setattr(report, str(status), int(count or 0))
            continue
        while True:
            batch = select(TABLE.c.id).where(old).limit(batch_size).scalar_subquery()
            with engine.begin() as conn:
                done = conn.execute(delete(TABLE).where(TABLE.c.id.in_(batch))).rowcount
            if not done:
                break
            setattr(report, str(status), getattr(report, str(status)) + done)
            report.batches += 1
            if done < batch_size:
                break
    return report


def _db_now(conn: Connection) -> datetime:
    """The database's clock (every worker and command compares times against one clock)."""
    if conn.dialect.name == "postgresql":
        return aware(conn.execute(select(func.now())).scalar_one())
    return datetime.now(UTC)
