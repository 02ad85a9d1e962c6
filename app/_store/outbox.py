"""``outbox_messages`` as the worker's sender sees it: take, start, record, give back.

A message moves through three fences, each a value of ``leased_by``:

- **taken** (``<batch token>``): held for :data:`HOLD_SECONDS` (extended while the batch
  runs), no attempt charged; a worker that dies leaves it due again within seconds;
- **started** (``<batch token>/<id>``): its attempt is charged and its lease is its
  kind's ``lease_seconds`` from now, just before its sender is called;
- **recorded**: its outcome is stored only while the started token is still its
  ``leased_by`` (another worker has not taken it since its lease ran out).

Every statement of a step is idempotent, so a step whose connection was lost is simply
sent again on a fresh one (:func:`idemhook._engine.attempt.retrying`): starting twice charges once
(the charge is taken only from the batch token), and recording twice stores once (a
recorded message is recognised by its status).

On PostgreSQL a step is one statement and one round trip: the previous message's record,
the next message's start and, now and then, the batch's hold, as data-modifying CTEs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select, text, update

from idemhook._contract import (
    Message,
)
from idemhook._store.database import (
    Database,
)
from idemhook._store.engine import aware
from idemhook._store.models import outbox_messages as TABLE
from idemhook._values.jsontext import (
    loads,
)
from idemhook._values.outbox_status import MessageStatus

#: How long a taken, not yet started message stays with its batch (extended while the
#: batch runs): a worker that dies leaves its untouched messages due again this soon.
HOLD_SECONDS = 2.0

_PENDING = str(MessageStatus.PENDING)

# -- adding (``event.outbox.add``, :mod:`idemhook._engine.outbox`) ----------------------------

#: PostgreSQL: the insert and the NOTIFY in one statement; NOTIFY is delivered at COMMIT,
#: and only if it commits (identical notifications of one transaction fold into one).
ADD_PG = text(
    "WITH added AS ("
    "INSERT INTO outbox_messages (kind, key, payload, status, attempts, next_attempt_at, "
    "created_at, source, event_id) "
    "VALUES (:kind, :key, CAST(:payload AS jsonb), 'pending', 0, now(), now(), "
    ":source, :event_id) "
    "ON CONFLICT (kind, key) DO NOTHING RETURNING id) "
    "SELECT id, pg_notify(:channel, :kind) FROM added"
)
EXISTING = text("SELECT id FROM outbox_messages WHERE kind = :kind AND key = :key")
NOTIFY = text("SELECT pg_notify(:channel, :kind)")

# -- sending (:mod:`idemhook._engine.sender`) -------------------------------------------------

_TAKE_PG = (
    # Taking is not worth a disk flush: if a crash loses it, the message is simply due.
    "SET LOCAL synchronous_commit TO OFF; "
    "WITH due AS ("
    "SELECT id FROM outbox_messages "
    "WHERE status = 'pending' AND next_attempt_at <= now() AND kind = ANY(%(kinds)s) "
    "ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
    "UPDATE outbox_messages AS m SET leased_by = %(lease)s, "
    "next_attempt_at = now() + make_interval(secs => %(hold)s) "
    "FROM due WHERE m.id = due.id "
    "RETURNING m.id, m.kind, m.key, m.payload, m.attempts, m.created_at, m.source, m.event_id"
)
_STEP_PG = (
    "WITH recorded AS ("
    "UPDATE outbox_messages AS m SET status = v.status, "
    "result = COALESCE(CAST(v.result AS jsonb), m.result), "
    "last_error = COALESCE(v.error, m.last_error), "
    "sent_at = CASE WHEN v.status = 'sent' THEN now() ELSE m.sent_at END, "
    "next_attempt_at = CASE WHEN v.status = 'pending' "
    "THEN now() + make_interval(secs => v.delay) ELSE m.next_attempt_at END, "
    "leased_by = NULL "
    "FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(statuses)s AS text[]), "
    "CAST(%(results)s AS text[]), CAST(%(errors)s AS text[]), CAST(%(delays)s AS float8[]), "
    "CAST(%(tokens)s AS text[])) AS v(id, status, result, error, delay, token) "
    "WHERE m.id = v.id AND m.leased_by = v.token "
    "RETURNING m.id), "
    "started AS ("
    "UPDATE outbox_messages SET "
    "attempts = attempts + CASE WHEN leased_by = %(lease)s THEN 1 ELSE 0 END, "
    "leased_by = %(token)s, last_attempt_at = now(), "
    "next_attempt_at = now() + make_interval(secs => %(seconds)s) "
    "WHERE id = %(start)s AND status = 'pending' AND leased_by IN (%(lease)s, %(token)s) "
    "RETURNING attempts), "
    "held AS ("
    "UPDATE outbox_messages SET next_attempt_at = now() + make_interval(secs => %(hold)s) "
    "WHERE id = ANY(CAST(%(rest)s AS bigint[])) AND leased_by = %(lease)s) "
    "SELECT 'recorded', id FROM recorded UNION ALL SELECT 'started', attempts FROM started"
)
_RECORDED_PG = (
    "SELECT id, status FROM outbox_messages WHERE id = ANY(CAST(%(ids)s AS bigint[])) "
    "AND leased_by IS NULL"
)
_GIVE_BACK_PG = (
    "UPDATE outbox_messages SET leased_by = NULL, next_attempt_at = now() "
    "WHERE id = ANY(%(ids)s) AND leased_by = %(lease)s; "
    "SELECT pg_notify(%(channel)s, '')"
)
_NEXT_DUE_PG = (
    "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now()) FROM outbox_messages "
    "WHERE status = 'pending' AND kind = ANY(%(kinds)s)"
)


@dataclass(frozen=True, slots=True)
class Record:
    """The outcome of one started message, to store."""

    id: int
    token: str
    status: MessageStatus
    result: str | None = None  # JSON text
    error: str | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Start:
    """The message to start: its started token and its lease."""

    id: int
    token: str
    lease_seconds: float


class OutboxStore:
    """The sender's statements on one database (PostgreSQL: one round trip each)."""

    def __init__(self, database: Database, kinds: Sequence[str]) -> None:
        self.database = database
        self.kinds = list(kinds)
        self._postgresql = database.engine.dialect.name == "postgresql"

    # -- PostgreSQL: one message on a lane per step ---------------------------------------------

    def _run(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with self.database.lanes.lane() as lane:
            cursor = lane.execute_alone(sql, params)
            return cursor.fetchall() if cursor.description else []

    def take(self, lease: str, limit: int) -> list[Message]:
        """Take up to ``limit`` due messages of our kinds for the batch ``lease``.

        Each one's ``attempts`` are those made before: its send is not started yet.
        """
        if self._postgresql:
            params = {"kinds": self.kinds, "limit": limit, "lease": lease, "hold": HOLD_SECONDS}
            rows = self._run(_TAKE_PG, params)
        else:
            rows = self._take_sqlite(lease, limit)
        return sorted(
            (Message(*row[:5], aware(row[5]), *row[6:]) for row in rows), key=lambda m: m.id
        )

    def step(
        self,
        lease: str,
        records: Sequence[Record],
        start: Start | None,
        hold: Sequence[int] = (),
        *,
        again: bool = False,
    ) -> tuple[set[int], int | None]:
        """Record ``records``, start ``start``, hold the batch's ``hold`` ids; one transaction.

        Returns the ids recorded (those whose started token was still theirs) and the
        started message's attempts (None: it is not ours any more). ``again``: this step
        was sent before on a connection that was lost; a record that landed then is
        recognised now by its status.
        """
        if self._postgresql:
            params = {
                "ids": [r.id for r in records],
                "statuses": [str(r.status) for r in records],
                "results": [r.result for r in records],
                "errors": [r.error for r in records],
                "delays": [r.delay for r in records],
                "tokens": [r.token for r in records],
                "lease": lease,
                "start": start.id if start else None,
                "token": start.token if start else None,
                "seconds": start.lease_seconds if start else 0.0,
                "rest": list(hold),
                "hold": HOLD_SECONDS,
            }
            rows = self._run(_STEP_PG, params)
            kept = {value for what, value in rows if what == "recorded"}
            attempts = next((value for what, value in rows if what == "started"), None)
        else:
            kept, attempts = self._step_sqlite(lease, records, start, hold)
        if again and len(kept) < len(records):
            kept |= self._recorded([r for r in records if r.id not in kept])
        return kept, attempts

    def _recorded(self, records: Sequence[Record]) -> set[int]:
        """Of ``records``, those whose outcome is stored (an earlier step landed)."""
        wanted = {r.id: str(r.status) for r in records}
        if self._postgresql:
            rows = self._run(_RECORDED_PG, {"ids": list(wanted)})
        else:
            with self.database.engine.connect() as conn:
                rows = conn.execute(
                    select(TABLE.c.id, TABLE.c.status).where(
                        TABLE.c.id.in_(list(wanted)), TABLE.c.leased_by.is_(None)
                    )
                ).all()
        return {row_id for row_id, status in rows if wanted.get(row_id) == status}

    def give_back(self, lease: str, ids: Sequence[int], channel: str) -> None:
        """Hand taken, unstarted messages back to every worker, due at once."""
        if not ids:
            return
        if self._postgresql:
            self._run(_GIVE_BACK_PG, {"ids": list(ids), "lease": lease, "channel": channel})
            return
        with self.database.engine.begin() as conn:
            conn.execute(
                update(TABLE)
                .where(TABLE.c.id.in_(list(ids)), TABLE.c.leased_by == lease)
                .values(leased_by=None, next_attempt_at=datetime.now(UTC))
            )

    def next_due(self) -> float | None:
        """Seconds until the earliest pending message of our kinds falls due (None: none)."""
        if self._postgresql:
            [(seconds,)] = self._run(_NEXT_DUE_PG, {"kinds": self.kinds})
            return None if seconds is None else float(seconds)
        with self.database.engine.begin() as conn:
            earliest = conn.execute(
                select(func.min(TABLE.c.next_attempt_at)).where(
                    TABLE.c.status == _PENDING, TABLE.c.kind.in_(self.kinds)
                )
            ).scalar()
        if earliest is None:
            return None
        return (aware(earliest) - datetime.now(UTC)).total_seconds()

    # -- SQLite (the demo): one writer at a time, no SKIP LOCKED needed ------------------------

    def _take_sqlite(self, lease: str, limit: int) -> list[tuple[Any, ...]]:
        now = datetime.now(UTC)
        with self.database.engine.begin() as conn:
            ids = (
                conn.execute(
                    select(TABLE.c.id)
                    .where(
                        TABLE.c.status == _PENDING,
                        TABLE.c.next_attempt_at <= now,
                        TABLE.c.kind.in_(self.kinds),
                    )
                    .order_by(TABLE.c.next_attempt_at, TABLE.c.id)
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            if not ids:
                return []
            return [
                tuple(row)
                for row in conn.execute(
                    update(TABLE)
                    .where(TABLE.c.id.in_(ids))
                    .values(leased_by=lease, next_attempt_at=now + timedelta(seconds=HOLD_SECONDS))
                    .returning(
                        TABLE.c.id,
                        TABLE.c.kind,
                        TABLE.c.key,
                        TABLE.c.payload,
                        TABLE.c.attempts,
                        TABLE.c.created_at,
                        TABLE.c.source,
                        TABLE.c.event_id,
                    )
                ).all()
            ]

    def _step_sqlite(
        self, lease: str, records: Sequence[Record], start: Start | None, hold: Sequence[int]
    ) -> tuple[set[int], int | None]:
        now = datetime.now(UTC)
        kept: set[int] = set()
        attempts = None
        with self.database.engine.begin() as conn:
            for r in records:
                values: dict[str, Any] = {"status": str(r.status), "leased_by": None}
                if r.result is not None:
                    values["result"] = loads(r.result)
                if r.error is not None:
                    values["last_error"] = r.error
                if r.status is MessageStatus.SENT:
                    values["sent_at"] = now
                if r.status is MessageStatus.PENDING:
                    values["next_attempt_at"] = now + timedelta(seconds=r.delay)
                changed = conn.execute(
                    update(TABLE)
                    .where(TABLE.c.id == r.id, TABLE.c.leased_by == r.token)
                    .values(values)
                ).rowcount
                if changed:
                    kept.add(r.id)
            if start is not None:
                charge = case((TABLE.c.leased_by == lease, 1), else_=0)
                attempts = conn.execute(
                    update(TABLE)
                    .where(
                        TABLE.c.id == start.id,
                        TABLE.c.status == _PENDING,
                        or_(TABLE.c.leased_by == lease, TABLE.c.leased_by == start.token),
                    )
                    .values(
                        attempts=TABLE.c.attempts + charge,
                        leased_by=start.token,
                        last_attempt_at=now,
                        next_attempt_at=now + timedelta(seconds=start.lease_seconds),
                    )
                    .returning(TABLE.c.attempts)
                ).scalar()
            if hold:
                conn.execute(
                    update(TABLE)
                    .where(and_(TABLE.c.id.in_(list(hold)), TABLE.c.leased_by == lease))
                    .values(next_attempt_at=now + timedelta(seconds=HOLD_SECONDS))
                )
        return kept, attempts
