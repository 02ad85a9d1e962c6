"""Delivering outbox messages: the worker's outbox work (:class:`Delivery`).

A batch at a time, in short transactions (no lock is held while a sender runs), with the
statements of :mod:`idemhook._store.outbox`:

1. **take** a batch of due messages of the kinds this worker has senders for
   (``FOR UPDATE SKIP LOCKED``: workers never wait on each other, never take the same
   message). They are *held* for :data:`~idemhook._store.outbox.HOLD_SECONDS`, extended while
   the batch runs, and charged nothing: a worker that dies leaves the messages it had not
   started due again within seconds, their attempts untouched.
2. **start** each message just before its send: its attempt is charged, its lease (its
   kind's ``lease_seconds``) begins now, and its ``leased_by`` becomes its own token.
   A message another worker took meanwhile (its hold ran out during a long send) is
   skipped.
3. **send** it: its sender is called with a :class:`~idemhook._engine.outbox.Message`.
4. **record** the outcome, fenced by the message's token, in the same round trip as the
   next message's start, so every result is stored before the next send begins: a
   return is ``sent``; an exception is retried after :func:`idemhook._engine.worker.backoff`, or
   ``dead`` on the kind's last attempt; ``Reject`` is ``dead`` at once.

A step whose connection was lost (a failover, a restart, ``idle_session_timeout``) is
sent again on a fresh connection (:func:`idemhook._engine.attempt.retrying`: every
statement of a step is idempotent); if the database stays away, the outcomes in hand are
kept and recorded first thing when it is back. So a message is sent again only when its
own send may have happened without its result being stored: its worker died (or stalled
past its lease) during that send. A message whose every allowed attempt ended that way goes ``dead``
without another send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.exc import DBAPIError

from idemhook._contract import (
    Message,
    Reject,
)
from idemhook._engine.attempt import retrying
from idemhook._engine.logs import log_fields
from idemhook._engine.observing import DeliveryObserver
from idemhook._engine.registry import (
    Sender,
)
from idemhook._engine.worker import Worker, backoff, worker_name
from idemhook._store.database import (
    Database,
)
from idemhook._store.notify import OUTBOX_CHANNEL
from idemhook._store.outbox import HOLD_SECONDS, OutboxStore, Record, Start
from idemhook._values.jsontext import (
    dumps,
)
from idemhook._values.outbox_status import MessageStatus

log = logging.getLogger("idemhook.outbox")

DEFAULT_BATCH = 50


@dataclass(slots=True)
class _Outcome:
    """What one attempt at one message came to (recorded with the next step)."""

    message: Message
    record: Record
    seconds: float = 0.0
    error_type: str | None = None


class Delivery:
    """The outbox's kind of work: deliver due messages through their senders."""

    name = "outbox"
    channels = (OUTBOX_CHANNEL,)

    def __init__(
        self,
        database: Database,
        senders: Mapping[str, Sender],
        *,
        batch: int = DEFAULT_BATCH,
        metrics: DeliveryObserver | None = None,
    ) -> None:
        self.senders = dict(senders)
        self.kinds = sorted(self.senders)
        self.store = OutboxStore(database, self.kinds)
        self.max_batch = max(1, batch)
        self.batch = self.max_batch
        self.metrics = metrics
        self._worker = worker_name()
        self._batches = 0
        #: Message and not yet started (given back on stop).
        self._held: tuple[str, list[Message]] | None = None
        #: Outcomes whose step the database refused (it was down): recorded first next time.
        self._unrecorded: list[_Outcome] = []

    # -- the straight line ---------------------------------------------------------------------

    def step(self, worker: Worker) -> float | None:
        if not self.kinds:
            return None
        if self._unrecorded:
            self._step("", [], None)
        self._batches += 1
        lease = f"{self._worker}:{self._batches}"
        taken = self.store.take(lease, self.batch)
        if not taken:
            return self.store.next_due()
        self._deliver(lease, taken, worker)
        return 0.0

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            lease, messages = held
            self.store.give_back(lease, [m.id for m in messages], OUTBOX_CHANNEL)

    # -- one batch -----------------------------------------------------------------------------

    def _deliver(self, lease: str, taken: list[Message], worker: Worker) -> None:
        done: list[_Outcome] = []
        held_at = time.monotonic()
        for position, message in enumerate(taken):
            rest = taken[position + 1 :]
            self._held = (lease, taken[position:])
            if worker.stopping:
                self._step(lease, done, None)
                self.release()
                return
            sender = self.senders[message.kind]
            if message.attempts >= sender.max_attempts:
                # Every allowed attempt ended with its worker gone (a message that kills
                # its worker, or a lease shorter than a send): not handed out again.
                done.append(_given_up(sender, message, lease))
                self._held = (lease, rest)
                continue
            hold: Sequence[int] = ()
            if rest and time.monotonic() - held_at > HOLD_SECONDS / 2:
                hold, held_at = [m.id for m in rest], time.monotonic()
            start = Start(message.id, f"{lease}/{message.id}", sender.lease_seconds)
            attempts = self._step(lease, done, start, hold)
            done = []
            self._held = (lease, rest)
            if attempts is None:
                continue  # its hold ran out during a long send and another worker took it
            done = [self.send_one(sender, message, attempts, start.token)]
        self._held = None
        self._step(lease, done, None)

    def _step(
        self, lease: str, done: list[_Outcome], start: Start | None, hold: Sequence[int] = ()
    ) -> int | None:
        """Record ``done`` (and any outcomes left over), start ``start``; its attempts."""
        outcomes = self._unrecorded + done
        self._unrecorded = []
        records = [o.record for o in outcomes]
        try:
            kept, attempts = retrying(
                lambda again: self.store.step(lease, records, start, hold, again=again),
                unavailable=lambda exc: exc,
            )
        except DBAPIError:
            self._unrecorded = outcomes  # recorded when the database is back
            raise
        for outcome in outcomes:
            self._report(outcome, kept=outcome.record.id in kept)
        return attempts

    # -- send ----------------------------------------------------------------------------------

    def send_one(self, sender: Sender, taken: Message, attempts: int, token: str) -> _Outcome:
        message = replace(taken, attempts=attempts)  # counting this one
        started = time.perf_counter()
        try:
            value = sender.func(message)
        except Reject as rejected:
            record = Record(
                taken.id,
                token,
                MessageStatus.DEAD,
                result=dumps(rejected.result()),
                error=f"{sender.name} rejected the message: {rejected.reason}",
            )
            outcome = _Outcome(message, record, error_type="Reject")
        except Exception as exc:  # any failure of a sender is retried, up to the limit
            error = f"{sender.name} raised {type(exc).__name__}: {exc}"
            if attempts >= sender.max_attempts:
                record = Record(taken.id, token, MessageStatus.DEAD, error=error)
            else:
                delay = backoff(attempts, sender.backoff_seconds, sender.max_backoff_seconds)
                record = Record(taken.id, token, MessageStatus.PENDING, error=error, delay=delay)
            outcome = _Outcome(message, record, error_type=type(exc).__name__)
        else:
            record = Record(taken.id, token, MessageStatus.SENT, result=_result_text(sender, value))
            outcome = _Outcome(message, record)
        outcome.seconds = time.perf_counter() - started
        return outcome

    # -- telling -------------------------------------------------------------------------------

    def _report(self, outcome: _Outcome, *, kept: bool) -> None:
        message, record = outcome.message, outcome.record
        status = "retry" if record.status is MessageStatus.PENDING else str(record.status)
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


def _given_up(sender: Sender, taken: Message, lease: str) -> _Outcome:
    """``dead`` without a send: each allowed attempt ended before its result was recorded."""
    error = (
        f"gave up after {sender.max_attempts} attempts: each time, the worker sending "
        "it stopped before recording the result (killed, or a send longer than "
        f"lease_seconds={sender.lease_seconds:g})"
    )
    # Recorded under the batch's token: it was never started.
    record = Record(taken.id, lease, MessageStatus.DEAD, error=error)
    return _Outcome(taken, record, error_type="LeaseExpired")


def _result_text(sender: Sender, value: Any) -> str:
    """The result to store: the sender's return value, or a note if JSON cannot hold it.

    The message was delivered either way: failing it here would send it again.
    """
    try:
        return dumps(value, strict=True)
    except (TypeError, ValueError):
        log.warning(
            "%s returned a result JSON cannot hold (%s); stored as a note",
            sender.name,
            type(value).__name__,
        )
        return dumps({"unstorable_result": type(value).__name__})
