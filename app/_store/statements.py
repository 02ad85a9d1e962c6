"""The claim's own SQL, built from Core and compiled once per dialect.

The statements run on a lane's DBAPI cursor (:mod:`idemhook._store.lanes`), so values are
passed the way SQLAlchemy's own types would pass them: JSON as text serialised
by :func:`idemhook._store.database.dumps`, timestamps through the dialect's bind processor.

- :attr:`ClaimStatements.claim_sql`: ``INSERT ... ON CONFLICT (source, event_id)
  DO UPDATE SET duplicate_count = duplicate_count + 1 ... RETURNING``. A returned
  ``duplicate_count`` of 0 means this transaction inserted the row.
- :attr:`ClaimStatements.finish_sql`: store one event's status and result by id.
- :meth:`ClaimStatements.store`: store many results in one ``UPDATE ... FROM (VALUES ...)``.
- :attr:`ClaimStatements.claim_many_sql` (PostgreSQL): a batch's claims in one statement,
  its events as one JSON parameter (:meth:`ClaimStatements.claim_many_params`).
- :attr:`ClaimStatements.fresh`: for a source with ``freshness``, the claim with the check
  of its object's version in the same statement (:mod:`idemhook._store.object_versions`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    bindparam,
    cast,
    column,
    delete,
    literal_column,
    update,
    values,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

from idemhook._contract import (
    Event,
)
from idemhook._store.models import RECEIVED_VIA, processed_events
from idemhook._store.object_versions import FreshStatements
from idemhook._values.jsontext import dumps, string
from idemhook._values.outcome import Status

#: ``received_via`` of an event a reconcile run applied (docs/reconcile.md).
RECONCILE = RECEIVED_VIA[1]
#: The columns of the VALUES list that stores a batch's results.
STORE_COLUMNS = ("id", "status", "result", "processed_at")
#: Every parameter name the single-row statements take (see ClaimStatements._compile).
_PARAMETERS = frozenset(
    {
        "source",
        "event_id",
        "event_type",
        "status",
        "received_at",
        "payload",
        "headers",
        "row_id",
        "result",
        "processed_at",
        "tenant",
    }
)


#: A batch's claims in one statement (PostgreSQL): the events come as one JSON parameter,
#: ``{"h": headers, "t": time of receipt, "n": tenant (absent: none),
#: "e": [[id, type, payload, status, repeats], ...]}``
#: and the source a literal (a checked name); psycopg2 spends about
#: 10,000 instructions on each parameter it quotes: four per event cost more than the JSON
#: text), each ID once (one statement cannot insert a row and update it too) with the number
#: of its repeats in the delivery, which count as duplicates as they would one by one. A
#: returned ``duplicate_count`` equal to the repeats sent: inserted here; more: it was there.
#: ``ORDER BY`` the ID: concurrent deliveries that share events take their rows' locks in one
#: order, so they wait on each other, never deadlock.
CLAIM_MANY_PG = (
    "WITH d AS (SELECT CAST(%(d)s AS jsonb) AS d) "
    "INSERT INTO processed_events AS e (source, event_id, event_type, status, received_at, "
    "payload, headers, duplicate_count, replay_count, last_seen_at, tenant) "
    "SELECT {source}, a.x->>0, a.x->>1, a.x->>3, t.t, a.x->2, d.d->'h', (a.x->>4)::integer, "
    "0, t.t, d.d->>'n' FROM d, CAST(d.d->>'t' AS timestamptz) AS t(t), "
    "jsonb_array_elements(d.d->'e') AS a(x) ORDER BY a.x->>0 "
    "ON CONFLICT (source, event_id) DO UPDATE SET "
    "duplicate_count = e.duplicate_count + 1 + excluded.duplicate_count, "
    "last_seen_at = excluded.last_seen_at "
    "RETURNING e.event_id, e.id, e.duplicate_count, e.status, e.result"
)


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """What the claim statement returned for one event."""

    id: int
    #: 0: this transaction inserted the claim; more: it was already there (a duplicate).
    duplicates: int
    status: str
    result: Any


class ClaimStatements:
    """The claim's statements for one dialect."""

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        table = processed_events
        dialect_insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert

        def claim_statement(**extra: Any) -> Any:
            stmt = dialect_insert(table).values(
                source=bindparam("source", type_=String),
                event_id=bindparam("event_id", type_=String),
                event_type=bindparam("event_type", type_=String),
                status=bindparam("status", type_=String),
                received_at=bindparam("received_at", type_=String),
                payload=bindparam("payload", type_=String),
                headers=bindparam("headers", type_=String),
                duplicate_count=literal_column("0"),
                replay_count=literal_column("0"),
                last_seen_at=bindparam("received_at", type_=String),
                **extra,
            )
            return stmt.on_conflict_do_update(
                index_elements=[table.c.source, table.c.event_id],
                set_={
                    "duplicate_count": table.c.duplicate_count + literal_column("1"),
                    "last_seen_at": stmt.excluded.last_seen_at,
                },
            ).returning(table.c.id, table.c.duplicate_count, table.c.status, table.c.result)

        self.claim_sql = self._compile(claim_statement())
        #: The same claim for an event a reconcile run found (``received_via``; the column's
        #: default, ``delivery``, is every live delivery's: its statement is unchanged).
        self.recovered_claim_sql = self._compile(
            claim_statement(received_via=literal_column(f"'{RECONCILE}'"))
        )
        finish = (
            update(table)
            .where(table.c.id == bindparam("row_id", type_=Integer))
            .values(
                status=bindparam("status", type_=String),
                result=bindparam("result", type_=String),
                processed_at=bindparam("processed_at", type_=String),
            )
        )
        self.finish_sql = self._compile(finish)
        #: Delete a claim this transaction made (an event of a batch whose handler failed).
        self.forget_sql = self._compile(
            delete(table).where(table.c.id == bindparam("row_id", type_=Integer))
        )
        self._timestamp = (
            UtcText()
            if dialect.name == "postgresql"
            else processor(table.c.received_at.type, dialect, bind=True)
        )
        self._result = processor(table.c.result.type, dialect, bind=False)
        self._store_many: dict[int, str] = {}  # see store_many_sql
        #: Sent with the COMMIT of a transaction that only counted duplicates: no disk flush.
        self.duplicates_only_sql = "SET LOCAL synchronous_commit TO OFF"
        #: A delivery's claims in one statement (PostgreSQL only; SQLite claims one by one).
        self.claim_many_sql = CLAIM_MANY_PG if dialect.name == "postgresql" else None
        self._claim_many: dict[str, str] = {}  # claim_many_for
        #: A source with ``freshness``: the claim and the check of its object's version.
        self.fresh = FreshStatements(dialect, self.claim_sql, self._timestamp)
        #: The claim of a tenant's event (``processed_events.tenant``), and with freshness:
        #: statements of their own, so that the claim of every other delivery is unchanged.
        self.tenant_claim_sql = self._compile(
            claim_statement(tenant=bindparam("tenant", type_=String))
        )
        self.tenant_fresh = FreshStatements(dialect, self.tenant_claim_sql, self._timestamp)

    def _compile(self, statement: Any, names: Collection[str] = _PARAMETERS) -> str:
        return compile_statement(statement, self.dialect, names)

    def claim_params(
        self, event: Event, status: Status, headers: str, payload: str | None = None
    ) -> dict:
        """The claim's parameters (``headers``: the delivery's stored headers, as JSON;
        ``payload``: the event's payload as JSON text, when the caller has it already)."""
        params = {
            "source": event.source,
            "event_id": event.id,
            "event_type": event.type,
            "status": str(status),
            "received_at": self._timestamp(event.received_at),
            "payload": dumps(event.payload) if payload is None else payload,
            "headers": headers,
        }
        if event.tenant is not None:  # the tenant's statements (tenant_claim_sql)
            params["tenant"] = event.tenant
        return params

    def claim_many_params(
        self,
        events: Sequence[Event],
        statuses: Sequence[Status],
        repeats: Sequence[int],
        headers: str,
    ) -> dict[str, Any]:
        """:data:`CLAIM_MANY_PG`'s parameters: ``events`` (distinct IDs, one source, one
        time of receipt: one delivery's), the status each is claimed with and how many
        more times the delivery holds it."""
        items = ",".join(
            f'[{string(event.id)},{string(event.type)},{dumps(event.payload)},"{status}",{n}]'
            for event, status, n in zip(events, statuses, repeats, strict=True)
        )
        first = events[0]
        tenant = "" if first.tenant is None else f',"n":{string(first.tenant)}'
        received_at = first.received_at.isoformat()
        return {"d": f'{{"h":{headers},"t":"{received_at}"{tenant},"e":[{items}]}}'}

    def claim_many_for(self, source: str) -> str:
        """:data:`CLAIM_MANY_PG` for ``source`` (a checked name, [A-Za-z0-9_.-]: a literal)."""
        sql = self._claim_many.get(source)
        if sql is None:
            sql = CLAIM_MANY_PG.format(source=f"'{source}'")
            if len(self._claim_many) < 1024:
                self._claim_many[source] = sql
        return sql

    def claim_rows(
        self, rows: Sequence[tuple[Any, ...]], repeats: Mapping[str, int]
    ) -> dict[str, ClaimRow]:
        """:data:`CLAIM_MANY_PG`'s rows, by event ID; ``duplicates`` 0 where inserted here."""
        result = self._result
        return {
            event_id: ClaimRow(row_id, count - repeats[event_id], status, result(value))
            for event_id, row_id, count, status, value in rows
        }

    def claim_row(self, row: tuple[Any, ...]) -> ClaimRow:
        row_id, duplicates, status, result = row
        return ClaimRow(row_id, duplicates, status, self._result(result))

    def result_row(self, row_id: int, status: Status, stored: str) -> dict[str, Any]:
        """The parameters that store one event's result (``stored``: its JSON text)."""
        return {
            "row_id": row_id,
            "status": str(status),
            "result": stored,
            "processed_at": self._timestamp(datetime.now(UTC)),
        }

    def store(self, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        """One statement that stores every result in ``rows``, and its parameters."""
        if len(rows) == 1:
            return self.finish_sql, rows[0]
        params: dict[str, Any] = {}
        for i, row in enumerate(rows):
            params.update(
                {
                    f"id_{i}": row["row_id"],
                    f"status_{i}": row["status"],
                    f"result_{i}": row["result"],
                    f"processed_at_{i}": row["processed_at"],
                }
            )
        return self.store_many_sql(len(rows)), params

    def store_many_sql(self, count: int) -> str:
        """``UPDATE ... FROM (VALUES ...)`` for ``count`` rows, compiled once per size.

        Compiling a fresh 100-row ``VALUES`` for every batch cost about a third
        of the time this statement saves. At most ``max_batch`` sizes are kept.
        """
        if count in self._store_many:
            return self._store_many[count]
        table = processed_events
        rows = values(
            column("id", BigInteger),
            column("status", String),
            column("result", String),  # JSON text
            column("processed_at", DateTime(timezone=True)),
            name="v",
        ).data([tuple(bindparam(f"{name}_{i}") for name in STORE_COLUMNS) for i in range(count)])
        result: Any = rows.c.result
        processed_at: Any = rows.c.processed_at
        if self.dialect.name == "postgresql":
            # VALUES gives its text columns no type: JSON and the time (UtcText) are cast.
            result = cast(result, JSONB)
            processed_at = cast(processed_at, DateTime(timezone=True))
        statement = (
            update(table)
            .where(table.c.id == rows.c.id)
            .values(status=rows.c.status, result=result, processed_at=processed_at)
        )
        names = {f"{name}_{i}" for name in STORE_COLUMNS for i in range(count)}
        sql = self._store_many[count] = self._compile(statement, names)
        return sql


class UtcText:
    """A UTC time as the text PostgreSQL reads back to the same ``timestamptz``.

    psycopg2 adapts a ``datetime`` for about 26,000 instructions (``isoformat`` and the
    adapter's own formatting) and a string for about 9,000; a claim passes two (its time of
    receipt, the result's ``processed_at``). Each second's ``YYYY-MM-DD HH:MM:SS`` is
    worked out once; the microseconds and the zone are added to it. A time in another zone,
    or none, is passed as it is, for psycopg2 to adapt.
    """

    def __init__(self) -> None:
        self._second: tuple[tuple[int, ...], str] = ((), "")

    def __call__(self, value: Any) -> Any:
        if type(value) is not datetime or value.tzinfo is not UTC:
            return value
        second = (value.second, value.minute, value.hour, value.day, value.month, value.year)
        cached = self._second  # one tuple, replaced whole: safe across threads
        if cached[0] != second:
            cached = self._second = (second, value.isoformat(" ")[:19])
        return f"{cached[1]}.{value.microsecond:06d}+00"


def compile_statement(statement: Any, dialect: Any, names: Collection[str]) -> str:
    """``statement`` as SQL text for ``dialect``, compiled once, run on a lane's cursor.

    Every value is passed at run time by name: a literal or a column default compiled
    in as a parameter would be missing from what the cursor is given, so any parameter
    not in ``names`` is refused here, at start-up.
    """
    compiled = statement.compile(dialect=dialect)
    unnamed = [name for name in compiled.params if name not in names]
    if unnamed:
        raise RuntimeError(f"parameters {unnamed} would not be passed: {compiled}")
    return str(compiled)


def processor(type_: Any, dialect: Any, *, bind: bool) -> Callable[[Any], Any]:
    """The dialect's bind or result processor for ``type_``, or the identity."""
    impl = type_.dialect_impl(dialect)
    found = impl.bind_processor(dialect) if bind else impl.result_processor(dialect, None)
    return found or _identity


def _identity(value: Any) -> Any:
    return value
