"""Delivering outbox messages: the worker's outbox work (:class:`Delivery`).

One step, each in short transactions of its own under the claim's timeouts:

1. **take** a batch of due messages of the kinds this worker has senders for:
   ``SELECT ... FOR UPDATE SKIP LOCKED`` (workers never wait on each other,
   never take the same message) inside an ``UPDATE`` that leases them:
   ``leased_by`` names this claim, ``next_attempt_at`` moves to the end of the
   kind's lease and ``attempts`` counts the attempt. The transaction commits at
   once: no lock is held while a sender runs. A worker that dies holding a
   message leaves it pending; it falls due again when the lease ends.
2. **send** each message: its sender is called with a :class:`~app.outbox.Message`.
3. **record** what happened, fenced by the lease (``WHERE leased_by = <this
   claim>``): a return is ``sent`` with its result; an exception is retried
   after :func:`app.worker.backoff`, or ``dead`` on the kind's last attempt;
   ``Reject`` is ``dead`` at once. A result is recorded right after its send;
   sends that take under a millisecond (a sender that only enqueues) are
   recorded together, within a few milliseconds.

A batch that runs into half of its lease gives back the messages it has not
started, so a message always starts with at least half of its lease to run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, case, func, select, update

from .db import Database, dumps, loads
from .logs import log_fields
from .outbox import CHANNEL, TABLE, Message
from .outbox_status import MessageStatus
from .plugins import Reject, Sender
from .worker import backoff, worker_name

if TYPE_CHECKING:
    from .metrics import OutboxMetrics
    from .worker import Worker

log = logging.getLogger("idemhook.outbox")

#: A send faster than this is "only enqueued": its result may wait for the next ones'.
SLOW_SEND_SECONDS = 0.001
#: The longest a fast send's result waits to be recorded with others.
RECORD_WINDOW_SECONDS = 0.005
DEFAULT_BATCH = 50

# PostgreSQL: each transaction is one or two round trips on a claim lane (app.lanes): the
# lane sends BEGIN and the SET LOCAL timeouts with the first statement, COMMIT on its own.
# Taking is not worth a disk flush: if a crash loses it, the message is simply due again.
_TAKE_PG = (
    "SET LOCAL synchronous_commit TO OFF; "
    "WITH due AS ("
    "SELECT id FROM outbox_messages "
    "WHERE status = 'pending' AND next_attempt_at <= now() AND kind = ANY(%(kinds)s) "
    "ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
    "UPDATE outbox_messages AS m SET attempts = m.attempts + 1, leased_by = %(lease)s, "
    "last_attempt_at = now(), next_attempt_at = now() + make_interval(secs => l.secs) "
    "FROM due, unnest(CAST(%(kinds)s AS text[]), CAST(%(leases)s AS float8[])) AS l(kind, secs) "
    "WHERE m.id = due.id AND l.kind = m.kind "
    "RETURNING m.id, m.kind, m.key, m.payload, m.attempts, m.created_at, m.source, m.event_id"
)
_RECORD_PG = (
    "UPDATE outbox_messages AS m SET status = v.status, "
    "result = COALESCE(CAST(v.result AS jsonb), m.result), "
    "last_error = COALESCE(v.error, m.last_error), "
    "sent_at = CASE WHEN v.status = 'sent' THEN now() ELSE m.sent_at END, "
    "next_attempt_at = CASE WHEN v.status = 'pending' "
    "THEN now() + make_interval(secs => v.delay) ELSE m.next_attempt_at END, "
    "leased_by = NULL "
    "FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(statuses)s AS text[]), "
    "CAST(%(results)s AS text[]), CAST(%(errors)s AS text[]), CAST(%(delays)s AS float8[])) "
    "AS v(id, status, result, error, delay) "
    "WHERE m.id = v.id AND m.leased_by = %(lease)s "
    "RETURNING m.id"
)
_GIVE_BACK_PG = (
    "UPDATE outbox_messages SET leased_by = NULL, next_attempt_at = now(), "
    "attempts = attempts - 1 WHERE id = ANY(%(ids)s) AND leased_by = %(lease)s; "
    "SELECT pg_notify(%(channel)s, '')"
)
_NEXT_DUE_PG = (
    "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now()) FROM outbox_messages "
    "WHERE status = 'pending' AND kind = ANY(%(kinds)s)"
)


@dataclass(slots=True)
class _Outcome:
    """What one attempt at one message came to (recorded by :meth:`Delivery._record`)."""

    message: Message
    status: MessageStatus
    result: str | None = None  # JSON text
    error: str | None = None
    delay: float = 0.0
    seconds: float = 0.0
    error_type: str | None = None


class Delivery:
    """The outbox's kind of work: deliver due messages through their senders."""

    name = "outbox"
    channels = (CHANNEL,)

    def __init__(
        self,
        database: Database,
        senders: Mapping[str, Sender],
        *,
        batch: int = DEFAULT_BATCH,
        metrics: OutboxMetrics | None = None,
    ) -> None:
        self.database = database
        self.senders = dict(senders)
        self.kinds = sorted(self.senders)
        self.leases = [self.senders[kind].lease_seconds for kind in self.kinds]
        self.max_batch = max(1, batch)
        self.batch = self.max_batch
        self.metrics = metrics
        self._postgresql = database.engine.dialect.name == "postgresql"
        self._worker = worker_name()
        self._claims = 0
        #: Per kind: a running mean of send durations (decides when results are recorded).
        self._send_seconds: dict[str, float] = {}
        #: Taken and not yet started (given back on stop).
        self._held: tuple[str, list[Message]] | None = None

    # -- the straight line ---------------------------------------------------------------------

    def step(self, worker: Worker) -> float | None:
        if not self.kinds:
            return None
        lease, messages = self._take()
        if not messages:
            return self._next_due()
        self._held = (lease, messages)
        self._deliver(lease, messages, worker)
        self._held = None
        return 0.0

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._give_back(*held)

    # -- take ----------------------------------------------------------------------------------

    def _take(self) -> tuple[str, list[Message]]:
        self._claims += 1
        lease = f"{self._worker}:{self._claims}"
        if self._postgresql:
            params = {"kinds": self.kinds, "leases": self.leases, "limit": self.batch,
                      "lease": lease}
            rows = self._transaction(_TAKE_PG, params)
        else:
            with self.database.engine.begin() as conn:
                rows = [tuple(r) for r in self._take_sqlite(conn, lease)]
        messages = sorted(
            (
                Message(id_, kind, key, payload, attempts, _aware(created), source, event_id)
                for id_, kind, key, payload, attempts, created, source, event_id in rows
            ),
            key=lambda m: m.id,
        )
        return lease, messages

    def _transaction(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` in a transaction of its own on a lane; return its rows."""
        with self.database.lanes.lane() as lane:
            lane.begin()
            try:
                cursor = lane.execute(sql, params)
                rows = cursor.fetchall() if cursor.description else []
                lane.commit()
            finally:
                if lane.in_transaction:
                    lane.rollback()
        return rows

    def _take_sqlite(self, conn: Connection, lease: str) -> list[Any]:
        # SQLite has one writer at a time (BEGIN IMMEDIATE, app.db): no SKIP LOCKED needed.
        now = datetime.now(UTC)
        ids = conn.execute(
            select(TABLE.c.id)
            .where(
                TABLE.c.status == str(MessageStatus.PENDING),
                TABLE.c.next_attempt_at <= now,
                TABLE.c.kind.in_(self.kinds),
            )
            .order_by(TABLE.c.next_attempt_at, TABLE.c.id)
            .limit(self.batch)
        ).scalars().all()
        if not ids:
            return []
        leases = zip(self.kinds, self.leases, strict=True)
        until = {kind: now + timedelta(seconds=seconds) for kind, seconds in leases}
        return list(
            conn.execute(
                update(TABLE)
                .where(TABLE.c.id.in_(ids))
                .values(
                    attempts=TABLE.c.attempts + 1,
                    leased_by=lease,
                    last_attempt_at=now,
                    next_attempt_at=case(until, value=TABLE.c.kind),
                )
                .returning(
                    TABLE.c.id, TABLE.c.kind, TABLE.c.key, TABLE.c.payload, TABLE.c.attempts,
                    TABLE.c.created_at, TABLE.c.source, TABLE.c.event_id,
                )
            ).all()
        )

    def _next_due(self) -> float | None:
        """Seconds until the earliest pending message of our kinds falls due (None: none)."""
        if self._postgresql:
            [(seconds,)] = self._transaction(_NEXT_DUE_PG, {"kinds": self.kinds})
            return None if seconds is None else float(seconds)
        with self.database.engine.begin() as conn:
            earliest = conn.execute(
                select(func.min(TABLE.c.next_attempt_at)).where(
                    TABLE.c.status == str(MessageStatus.PENDING), TABLE.c.kind.in_(self.kinds)
                )
            ).scalar()
        if earliest is None:
            return None
        return (_aware(earliest) - datetime.now(UTC)).total_seconds()

    # -- send ----------------------------------------------------------------------------------

    def _deliver(self, lease: str, messages: list[Message], worker: Worker) -> None:
        taken_at = time.monotonic()
        done: list[_Outcome] = []
        first_done = 0.0
        for position, message in enumerate(messages):
            sender = self.senders[message.kind]
            late = time.monotonic() - taken_at > sender.lease_seconds / 2
            if worker.stopping or late:
                self._record(lease, done)
                self._give_back(lease, messages[position:])
                if late:  # the batch was too large for these sends: take fewer next time
                    self.batch = max(1, self.batch // 2)
                return
            if done and self._send_seconds.get(message.kind, 0.0) >= SLOW_SEND_SECONDS:
                self._record(lease, done)  # a slow send next: record the fast ones first
                done = []
            self._held = (lease, messages[position + 1 :])
            outcome = self._send(sender, message)
            if not done:
                first_done = time.monotonic()
            done.append(outcome)
            if (
                outcome.seconds >= SLOW_SEND_SECONDS
                or time.monotonic() - first_done >= RECORD_WINDOW_SECONDS
            ):
                self._record(lease, done)
                done = []
        self._record(lease, done)
        self.batch = min(self.max_batch, self.batch * 2)

    def _send(self, sender: Sender, message: Message) -> _Outcome:
        if message.attempts > sender.max_attempts:
            # Every allowed attempt ended with its worker gone (a message that kills its
            # worker, or a lease shorter than a send): stop handing it out.
            error = (
                f"gave up after {sender.max_attempts} attempts: each time, the worker sending "
                "it stopped before recording the result (killed, or a send longer than "
                f"lease_seconds={sender.lease_seconds:g})"
            )
            return _Outcome(message, MessageStatus.DEAD, error=error, error_type="LeaseExpired")
        started = time.perf_counter()
        try:
            value = sender.func(message)
        except Reject as rejected:
            outcome = _Outcome(
                message,
                MessageStatus.DEAD,
                result=dumps(rejected.result()),
                error=f"{sender.name} rejected the message: {rejected.reason}",
                error_type="Reject",
            )
        except Exception as exc:  # any failure of a sender is retried, up to the limit
            error = f"{sender.name} raised {type(exc).__name__}: {exc}"
            if message.attempts >= sender.max_attempts:
                outcome = _Outcome(
                    message, MessageStatus.DEAD, error=error, error_type=type(exc).__name__
                )
            else:
                delay = backoff(
                    message.attempts, sender.backoff_seconds, sender.max_backoff_seconds
                )
                outcome = _Outcome(
                    message,
                    MessageStatus.PENDING,
                    error=error,
                    delay=delay,
                    error_type=type(exc).__name__,
                )
        else:
            outcome = _Outcome(message, MessageStatus.SENT, result=_result_text(sender, value))
        outcome.seconds = time.perf_counter() - started
        mean = self._send_seconds.get(message.kind, outcome.seconds)
        self._send_seconds[message.kind] = 0.8 * mean + 0.2 * outcome.seconds
        return outcome

    # -- record --------------------------------------------------------------------------------

    def _record(self, lease: str, done: Sequence[_Outcome]) -> None:
        if not done:
            return
        if self._postgresql:
            params = {
                "ids": [o.message.id for o in done],
                "statuses": [str(o.status) for o in done],
                "results": [o.result for o in done],
                "errors": [o.error for o in done],
                "delays": [o.delay for o in done],
                "lease": lease,
            }
            kept = {row[0] for row in self._transaction(_RECORD_PG, params)}
        else:
            with self.database.engine.begin() as conn:
                kept = self._record_sqlite(conn, lease, done)
        for outcome in done:
            self._report(outcome, kept=outcome.message.id in kept)

    def _record_sqlite(self, conn: Connection, lease: str, done: Sequence[_Outcome]) -> set[int]:
        now = datetime.now(UTC)
        kept = set()
        for o in done:
            values: dict[str, Any] = {"status": str(o.status), "leased_by": None}
            if o.result is not None:
                values["result"] = loads(o.result)
            if o.error is not None:
                values["last_error"] = o.error
            if o.status is MessageStatus.SENT:
                values["sent_at"] = now
            if o.status is MessageStatus.PENDING:
                values["next_attempt_at"] = now + timedelta(seconds=o.delay)
            changed = conn.execute(
                update(TABLE)
                .where(TABLE.c.id == o.message.id, TABLE.c.leased_by == lease)
                .values(values)
            ).rowcount
            if changed:
                kept.add(o.message.id)
        return kept

    def _give_back(self, lease: str, messages: Sequence[Message]) -> None:
        """Hand messages taken and not started back to every worker, due at once."""
        if not messages:
            return
        ids = [m.id for m in messages]
        if self._postgresql:
            self._transaction(_GIVE_BACK_PG, {"ids": ids, "lease": lease, "channel": CHANNEL})
            return
        with self.database.engine.begin() as conn:
            conn.execute(
                update(TABLE)
                .where(TABLE.c.id.in_(ids), TABLE.c.leased_by == lease)
                .values(
                    leased_by=None,
                    next_attempt_at=datetime.now(UTC),
                    attempts=TABLE.c.attempts - 1,
                )
            )

    def _report(self, outcome: _Outcome, *, kept: bool) -> None:
        message = outcome.message
        status = "retry" if outcome.status is MessageStatus.PENDING else str(outcome.status)
        if not kept:
            # The lease ran out and another worker took the message: its record wins.
            status = "lease_lost"
        if self.metrics is not None:
            self.metrics.observe_delivery(message.kind, status, outcome.seconds)
        fields: dict[str, Any] = {
            "kind": message.kind,
            "message_id": message.id,
            "attempt": message.attempts,
            "outcome": status,
            "duration_ms": round(outcome.seconds * 1000, 2),
        }
        if outcome.error_type is not None:
            fields["error"] = outcome.error_type
        level = logging.INFO
        if status in ("retry", "lease_lost"):
            level = logging.WARNING
        elif status == "dead":
            level = logging.ERROR
        log_fields(log, level, fields)


def _result_text(sender: Sender, value: Any) -> str:
    """The result to store: the sender's return value, or a note if JSON cannot hold it.

    The message was delivered either way: failing it here would send it again.
    """
    try:
        return dumps(value, strict=True)
    except (TypeError, ValueError):
        log.warning("%s returned a result JSON cannot hold (%s); stored as a note",
                    sender.name, type(value).__name__)
        return dumps({"unstorable_result": type(value).__name__})


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
