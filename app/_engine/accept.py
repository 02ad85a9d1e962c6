"""The asynchronous claim: record each event as ``received`` and answer at once.

A source with ``mode = "async"`` (docs/async.md) does not run handlers in the
request. Each event of a delivery is claimed in ``processed_events`` with status
``received``, its payload, the delivery's headers and its order key, and the
delivery is answered; ``idemhook worker`` applies it later (:mod:`idemhook._engine.applier`).

On PostgreSQL the whole delivery is **one message and one implicit transaction**
(:meth:`idemhook._store.lanes.Lane.execute_alone`): the ``SET LOCAL`` timeouts, for a source
with ``order_key`` an advisory lock per key, and one statement::

    WITH d AS (SELECT CAST(%(d)s AS jsonb) AS d),   -- the events: one JSON parameter
         claimed AS (INSERT INTO processed_events ... SELECT ... FROM jsonb_array_elements(...)
                     ON CONFLICT (source, event_id)
                     DO UPDATE SET duplicate_count = duplicate_count + 1 ... RETURNING ...),
         queued AS (INSERT INTO event_queue SELECT ... FROM claimed WHERE <new>)
    SELECT ... FROM claimed

(each new event gets its ``event_queue`` row, the one a worker locks). A returned
``duplicate_count`` of 0 is a new event (answered ``accepted``); above 0 a
duplicate, answered with the event's current state: ``accepted`` while it waits
for the worker, else its stored result.

**Waking the workers.** Once a claim with a new event has committed, the
process's :class:`Notifier` sends ``NOTIFY idemhook_events`` in a transaction of
its own, so workers wake when, and only when, the events are there to take. Not
in the claim's transaction: PostgreSQL serialises the commits of every
transaction that notifies (a cluster-wide lock held until the commit's WAL flush
is done, so that notifications are queued in commit order), which made every
acknowledgement wait for the previous one's disk flush and cost the ack path a
third of its requests/s in ``make bench``. The notifier's transaction commits
without waiting for its flush (``synchronous_commit`` off: a notification needs
no durability), and one notification covers every claim that committed before
it was sent. A notification lost on the way (the process dies between the
commit and the NOTIFY) is covered by the workers' poll.

**Receipt order.** For a source with ``order_key``, the ack takes
``pg_advisory_xact_lock`` on each of the delivery's keys (sorted, so two
deliveries never wait on each other crosswise) before its ``INSERT``: two
deliveries of one key are claimed one after the other, so a later event's ``id``
is higher *and* it commits later. The worker applies a key's events in ``id``
order (:mod:`idemhook._engine.applier`), and never sees a later event of a key without the
earlier ones.

Accepting is idempotent, so a delivery whose connection was lost is simply tried
once more on a fresh one (a claim that did commit comes back as a duplicate).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.dialects import sqlite

from idemhook._config.events import order_keys_of
from idemhook._config.freshness import Versioned, in_version_order
from idemhook._config.sources import Source
from idemhook._contract import (
    Event,
)
from idemhook._engine.attempt import retrying
from idemhook._store.claims import accept_sql, order_lock_sql
from idemhook._store.database import (
    Database,
)
from idemhook._store.models import RECEIVED_VIA, event_queue, processed_events
from idemhook._store.notify import EVENTS_CHANNEL, notify_sql
from idemhook._store.statements import processor
from idemhook._values.errors import ServiceUnavailable
from idemhook._values.headers import (
    safe_headers,
)
from idemhook._values.jsontext import dumps, string
from idemhook._values.outcome import Outcome, Status

#: The shortest time between two notifications of one process (seconds). Each is a
#: transaction and wakes every worker: at 5 ms, two web processes under load sent one per
#: three acks, and the ack path lost about a tenth of its requests/s to them (make bench);
#: an idle worker hears of a new event at most this much later (docs/async.md).
NOTIFY_INTERVAL = 0.02

#: The order key of a paused source's events when the source has none of its own: one
#: chain per source, applied in receipt order after ``idemhook sources resume``.
PAUSED_KEY = "(paused)"

Observer = Callable[[Event, Outcome, float], None]
log = logging.getLogger("idemhook.claim")


class Acceptor:
    """Claims the events of asynchronous sources as ``received`` (see the module docstring)."""

    def __init__(self, database: Database, observers: Sequence[Observer] = ()) -> None:
        self.database = database
        #: Called after each event with (event, outcome, seconds): logging and metrics.
        self.observers: list[Observer] = list(observers)
        dialect = database.engine.dialect
        self._postgresql = dialect.name == "postgresql"
        self._dialect = dialect
        self._timestamp = processor(processed_events.c.received_at.type, dialect, bind=True)
        self._result = processor(processed_events.c.result.type, dialect, bind=False)
        #: The statement per source (its name a literal), written once.
        self._sql: dict[str, str] = {}
        self._tenant_sql: dict[str, str] = {}
        #: Wakes the workers after a claim with new events commits (PostgreSQL).
        self.notifier = Notifier(database) if self._postgresql else None

    def accept(
        self,
        source: Source,
        events: Sequence[Event],
        versions: Sequence[Versioned] | None = None,
        *,
        paused: bool = False,
    ) -> list[Outcome]:
        """Claim ``events`` (one delivery to ``source``) as received; their outcomes.

        ``versions`` (a source with ``freshness``): the events are claimed in object and
        version order, so that the worker, which takes them in claim order, meets a
        delivery's events of one object oldest first.

        ``paused`` (``idemhook sources pause``, any source): a source without an
        ``order_key`` has its events claimed under the one key :data:`PAUSED_KEY`, so
        that after ``resume`` the worker applies them one at a time in receipt order.
        """
        return self._accept(source, events, versions, recovered=False, paused=paused)[0]

    def recover(self, source: Source, events: Sequence[Event]) -> list[bool]:
        """Claim ``events`` that a reconcile run found as received, marked ``reconcile``.

        The same claim as a delivery's (docs/reconcile.md); for each event, whether this
        claim recorded it (False: it was there already, a live delivery was first).
        """
        return self._accept(source, events, None, recovered=True)[1]

    def _accept(
        self,
        source: Source,
        events: Sequence[Event],
        versions: Sequence[Versioned] | None,
        *,
        recovered: bool,
        paused: bool = False,
    ) -> tuple[list[Outcome], list[bool]]:
        started = time.perf_counter()
        if source.order_key is not None:
            keys: list[str] | None = order_keys_of(source, list(events))
        else:
            keys = [PAUSED_KEY] * len(events) if paused else None
        distinct = _first_of_each(events)
        if versions is not None and len(distinct) > 1:
            ranks = {position: rank for rank, position in enumerate(in_version_order(versions))}
            distinct.sort(key=ranks.__getitem__)
        rows = self._claim_retrying(source, events, distinct, keys, recovered)
        outcomes = []
        fresh = []
        new = False
        for event in events:
            duplicates, status, result = rows[event.id]
            if not duplicates or status == Status.RECEIVED:
                outcome = Outcome(event.id, Status.ACCEPTED)
                new = new or not duplicates
            else:
                outcome = Outcome(event.id, Status.DUPLICATE, result)
            outcomes.append(outcome)
            fresh.append(not duplicates)
        if new and self.notifier is not None:
            self.notifier.poke()
        if self.observers:
            seconds = time.perf_counter() - started
            for event, outcome in zip(events, outcomes, strict=True):
                for observer in self.observers:
                    observer(event, outcome, seconds)
        return outcomes, fresh

    def _claim_retrying(
        self,
        source: Source,
        events: Sequence[Event],
        distinct: list[int],
        keys: list[str] | None,
        recovered: bool = False,
    ) -> dict[str, tuple[int, str, Any]]:
        """Claim; once more on a fresh connection if the first was lost (a restart)."""
        return retrying(
            lambda _again: self._claim(source, events, distinct, keys, recovered),
            unavailable=lambda _exc: ServiceUnavailable(
                "The database is unavailable; nothing was recorded. Retry shortly.",
                code="database_unavailable",
            ),
            in_progress=lambda _exc: ServiceUnavailable(
                "Another delivery of this event (or of its order key) is being recorded "
                "right now; retry shortly.",
                code="event_in_progress",
            ),
        )

    # -- PostgreSQL: one message --------------------------------------------------------------

    def _claim(
        self,
        source: Source,
        events: Sequence[Event],
        distinct: list[int],
        keys: list[str] | None,
        recovered: bool = False,
    ) -> dict[str, tuple[int, str, Any]]:
        if not self._postgresql:
            return self._claim_sqlite(source, events, distinct, keys, recovered)
        # The time of receipt is the database's now(), the clock the worker compares with.
        items = []
        for i in distinct:
            event = events[i]
            items.append(
                f"[{string(event.id)},{string(event.type)},{dumps(event.payload)},"
                f"{string(keys[i]) if keys is not None else 'null'}]"
            )
        document = f'{{"h":{dumps(safe_headers(events[0].headers))},"e":[{",".join(items)}]}}'
        tenant = events[0].tenant
        if tenant is not None:  # a tenant's delivery: its name joins the document
            document = f'{document[:-1]},"t":{string(tenant)}}}'
        params: dict[str, Any] = {"d": document}
        if recovered:  # rare: not worth a cache
            sql = accept_sql(source.name, recovered=True)
        elif tenant is not None:
            sql = self._tenant_sql.get(source.name) or self._compile(source, tenant=True)
        else:
            sql = self._sql.get(source.name) or self._compile(source)
        if keys is not None:
            locks = sorted({f"{source.name}\n{key}" for key in keys})
            sql = "".join(order_lock_sql(n) for n in range(len(locks))) + sql
            params.update({f"lock_{n}": key for n, key in enumerate(locks)})
        with self.database.lanes.lane() as lane:
            rows = lane.execute_alone(sql, params).fetchall()
        return {
            event_id: (duplicates, status, self._result(result))
            for event_id, duplicates, status, result in rows
        }

    def _compile(self, source: Source, *, tenant: bool = False) -> str:
        """The statement for ``source``: its name, [A-Za-z0-9_.-] (app.sources), a literal."""
        sql = accept_sql(source.name, tenant=tenant)
        cache = self._tenant_sql if tenant else self._sql
        if len(cache) < 1024:
            cache[source.name] = sql
        return sql

    # -- SQLite (the demo): one transaction, one statement per event -------------------------

    def _claim_sqlite(
        self,
        source: Source,
        events: Sequence[Event],
        distinct: list[int],
        keys: list[str] | None,
        recovered: bool = False,
    ) -> dict[str, tuple[int, str, Any]]:
        table = processed_events
        headers = safe_headers(events[0].headers)
        found = {}
        with self.database.engine.begin() as conn:  # BEGIN IMMEDIATE: one writer at a time
            for i in distinct:
                event = events[i]
                values = {
                    "source": source.name,
                    "event_id": event.id,
                    "event_type": event.type,
                    "status": str(Status.RECEIVED),
                    "received_at": event.received_at,
                    "payload": event.payload,
                    "headers": headers,
                    "duplicate_count": 0,
                    "replay_count": 0,
                    "last_seen_at": event.received_at,
                    "order_key": keys[i] if keys is not None else None,
                    "received_via": RECEIVED_VIA[1] if recovered else RECEIVED_VIA[0],
                    "tenant": event.tenant,
                }
                insert = sqlite.insert(table).values(values)
                statement = insert.on_conflict_do_update(
                    index_elements=[table.c.source, table.c.event_id],
                    set_={
                        "duplicate_count": table.c.duplicate_count + 1,
                        "last_seen_at": insert.excluded.last_seen_at,
                    },
                ).returning(table.c.id, table.c.duplicate_count, table.c.status, table.c.result)
                row_id, duplicates, status, result = conn.execute(statement).one()
                if not duplicates:
                    conn.execute(
                        event_queue.insert().values(
                            id=row_id,
                            source=source.name,
                            order_key=values["order_key"],
                            next_attempt_at=event.received_at,
                            received_at=event.received_at,
                        )
                    )
                found[event.id] = (duplicates, status, result)
        return found


class Notifier:
    """Sends ``NOTIFY idemhook_events`` after claims commit: one at a time, per process.

    :meth:`poke` (the request thread, after its claim committed) only sets a flag;
    the notifier's thread (started in each process that pokes, so never inherited
    through a fork) sends one notification per wake-up, in a transaction of its own
    on a claim lane. A poke during a send brings another send, so every commit is
    followed by a notification sent after it; pokes while one waits share it. At
    most one is sent every :data:`NOTIFY_INTERVAL` (a busy process's acks share
    them; the first after a quiet spell goes at once): each costs a round trip, and
    wakes every worker.
    """

    def __init__(self, database: Database) -> None:
        self._wanted = threading.Event()
        self._started_in: int | None = None
        self._lock = threading.Lock()
        # The thread holds the database weakly: a dropped app lets it end.
        self._database = weakref.ref(database)

    def poke(self) -> None:
        self._wanted.set()
        if self._started_in != os.getpid():
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._started_in == os.getpid():
                return
            self._started_in = os.getpid()
            thread = threading.Thread(
                target=_notify_forever,
                args=(self._wanted, self._database),
                name="idemhook-notify",
                daemon=True,
            )
            thread.start()


def _notify_forever(wanted: threading.Event, database_ref: weakref.ref[Database]) -> None:
    failures = 0
    while True:
        if not wanted.wait(timeout=5.0):
            if database_ref() is None:
                return  # the app is gone
            continue
        wanted.clear()
        database = database_ref()
        if database is None:
            return
        sent = time.monotonic()
        try:
            with database.lanes.lane() as lane:
                lane.execute_alone(notify_sql(EVENTS_CHANNEL))
        except Exception as exc:  # noqa: BLE001 (the workers' poll covers a lost notification)
            failures += 1
            log.warning("could not notify the workers (%s); they will poll", type(exc).__name__)
            pause = min(5.0, 0.1 * 2**failures)
        else:
            failures = 0
            pause = sent + NOTIFY_INTERVAL - time.monotonic()
        del database  # held only while sending
        time.sleep(max(0.0, pause))


def _first_of_each(events: Sequence[Event]) -> list[int]:
    """Positions of each event ID's first occurrence (a repeat inside a delivery is one claim:
    one statement cannot insert a row and update it too)."""
    seen: set[str] = set()
    positions = []
    for i, event in enumerate(events):
        if event.id not in seen:
            seen.add(event.id)
            positions.append(i)
    return positions
