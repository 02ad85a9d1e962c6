"""The claim's own SQL, built from Core and compiled once per dialect.

The statements run on a lane's DBAPI cursor (:mod:`idemhook._store.lanes`), so values are
passed the way SQLAlchemy's own types would pass them: JSON as text serialised
by :func:`idemhook._store.database.dumps`, timestamps through the dialect's bind processor.

- :attr:`ClaimStatements.claim_sql`: ``INSERT ... ON CONFLICT (source, event_id)
  DO UPDATE SET duplicate_count = duplicate_count + 1 ... RETURNING``. A returned
  ``duplicate_count`` of 0 means this transaction inserted the row.
- :attr:`ClaimStatements.finish_sql`: store one event's status and result by id.
- :meth:`ClaimStatements.store`: store many results in one ``UPDATE ... FROM (VALUES ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    and_,
    bindparam,
    case,
    cast,
    column,
    delete,
    func,
    literal_column,
    not_,
    null,
    or_,
    select,
    update,
    values,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

from idemhook._contract import (
    Event,
)
from idemhook._store.models import processed_events
from idemhook._values.jsontext import (
    dumps,
)
from idemhook._values.outcome import Status

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
    }
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
        )
        claim = stmt.on_conflict_do_update(
            index_elements=[table.c.source, table.c.event_id],
            set_={
                "duplicate_count": table.c.duplicate_count + literal_column("1"),
                "last_seen_at": stmt.excluded.last_seen_at,
            },
        ).returning(table.c.id, table.c.duplicate_count, table.c.status, table.c.result)
        self.claim_sql = self._compile(claim)
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
        self._timestamp = processor(table.c.received_at.type, dialect, bind=True)
        self._result = processor(table.c.result.type, dialect, bind=False)
        self._store_many: dict[int, str] = {}  # see store_many_sql
        #: Sent with the COMMIT of a transaction that only counted duplicates: no disk flush.
        self.duplicates_only_sql = "SET LOCAL synchronous_commit TO OFF"

    def _compile(self, statement: Any, names: Collection[str] = _PARAMETERS) -> str:
        return compile_statement(statement, self.dialect, names)

    def claim_params(self, event: Event, status: Status, headers: str) -> dict:
        """The claim's parameters (``headers``: the delivery's stored headers, as JSON)."""
        return {
            "source": event.source,
            "event_id": event.id,
            "event_type": event.type,
            "status": str(status),
            "received_at": self._timestamp(event.received_at),
            "payload": dumps(event.payload),
            "headers": headers,
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
        if self.dialect.name == "postgresql":
            result = cast(result, JSONB)
        statement = (
            update(table)
            .where(table.c.id == rows.c.id)
            .values(status=rows.c.status, result=result, processed_at=rows.c.processed_at)
        )
        names = {f"{name}_{i}" for name in STORE_COLUMNS for i in range(count)}
        sql = self._store_many[count] = self._compile(statement, names)
        return sql


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


# -- idempotency-key sources -----------------------------------------------------------------

#: Every parameter name of the key statements (see KeyStatements).
_KEY_PARAMETERS = frozenset(
    {
        "source",
        "event_id",
        "client",
        "event_type",
        "received_at",
        "payload",
        "headers",
        "fingerprint",
        "expires_at",
        "locked_until",
        "lock_owner",
        "now",
        "cutoff",
        "row_id",
        "status",
        "result",
        "response_status",
        "response_headers",
        "processed_at",
    }
)
#: Written by a finishing request that no longer holds the key's lease: the status CHECK
#: refuses it, so that request's transaction (and its handlers' work) cannot commit.
LEASE_LOST = "lease_lost"


@dataclass(frozen=True, slots=True)
class KeyRow:
    """A key's row as the lease statement leaves it."""

    id: int
    status: str
    lock_owner: str | None
    fingerprint: str | None
    result: Any
    response_status: int | None
    response_headers: Any


class KeyStatements:
    """The statements of an ``idempotency-key`` request (app.idempotency), for one dialect.

    - :attr:`count_sql`: count a replay (``duplicate_count``, ``last_seen_at``) of a key
      that is done, unexpired and has the same fingerprint; nothing else is touched.
    - :attr:`lease_sql`: ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``: claim the key as
      ``in_flight`` with a lease, or take it over when it has expired (a new request) or
      its lease has (a request that crashed, or this one's own earlier try). Otherwise
      the row is left as it is.
    - :attr:`read_sql`: the key's row, read after the lease has committed.
    - :attr:`finish_sql`: store the response by id; unless the lease is still this
      request's, the status becomes :data:`LEASE_LOST` and the CHECK refuses the commit.
    - :attr:`finish_checked_sql`: the same, refused when no row was updated.
    - :attr:`release_sql`: delete this request's own in-flight claim (the key is free);
      fenced by the owner token, which the finishing statement clears.
    """

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        table = processed_events
        c = table.c
        in_flight = literal_column(f"'{Status.IN_FLIGHT}'")
        now = bindparam("now", type_=String)
        # Rows claimed before key expiry existed have no expires_at: received_at + key_ttl.
        unexpired = func.coalesce(
            c.expires_at > now, c.received_at > bindparam("cutoff", type_=String)
        )
        fingerprint = bindparam("fingerprint", type_=String)
        same_request = or_(
            c.fingerprint.is_(None), fingerprint.is_(None), c.fingerprint == fingerprint
        )
        key = and_(
            c.source == bindparam("source", type_=String),
            c.event_id == bindparam("event_id", type_=String),
        )
        count = (
            update(table)
            .where(key, c.status != in_flight, unexpired, same_request)
            .values(duplicate_count=c.duplicate_count + literal_column("1"), last_seen_at=now)
        )
        self.count_sql = self._compile(count)

        dialect_insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        stmt = dialect_insert(table).values(
            source=bindparam("source", type_=String),
            event_id=bindparam("event_id", type_=String),
            client=bindparam("client", type_=String),
            event_type=bindparam("event_type", type_=String),
            status=in_flight,
            received_at=bindparam("received_at", type_=String),
            payload=bindparam("payload", type_=String),
            headers=bindparam("headers", type_=String),
            fingerprint=fingerprint,
            expires_at=bindparam("expires_at", type_=String),
            locked_until=bindparam("locked_until", type_=String),
            lock_owner=bindparam("lock_owner", type_=String),
            duplicate_count=literal_column("0"),
            replay_count=literal_column("0"),
            last_seen_at=bindparam("received_at", type_=String),
        )
        new = stmt.excluded
        lease_free = or_(c.locked_until <= now, c.lock_owner == new.lock_owner)
        takeover = or_(
            and_(c.status == in_flight, lease_free),
            and_(c.status != in_flight, not_(unexpired)),
        )
        nothing = null()
        lease = stmt.on_conflict_do_update(
            index_elements=[c.source, c.event_id],
            set_={
                "client": new.client,
                "event_type": new.event_type,
                "status": new.status,
                "received_at": new.received_at,
                "processed_at": nothing,
                "payload": new.payload,
                "headers": new.headers,
                "result": nothing,
                "duplicate_count": literal_column("0"),
                "last_seen_at": new.last_seen_at,
                "replayed_at": nothing,
                "replay_count": literal_column("0"),
                "fingerprint": new.fingerprint,
                "response_status": nothing,
                "response_headers": nothing,
                "expires_at": new.expires_at,
                "locked_until": new.locked_until,
                "lock_owner": new.lock_owner,
            },
            where=takeover,
        )
        self.lease_sql = self._compile(lease)
        read = select(
            c.id,
            c.status,
            c.lock_owner,
            c.fingerprint,
            c.result,
            c.response_status,
            c.response_headers,
        ).where(key)
        self.read_sql = self._compile(read)
        ours = c.lock_owner == bindparam("lock_owner", type_=String)
        status = case(
            (ours, bindparam("status", type_=String)), else_=literal_column(f"'{LEASE_LOST}'")
        )
        finish = (
            update(table)
            .where(c.id == bindparam("row_id", type_=Integer))
            .values(
                status=status,
                result=bindparam("result", type_=String),
                response_status=bindparam("response_status", type_=Integer),
                response_headers=bindparam("response_headers", type_=String),
                processed_at=bindparam("processed_at", type_=String),
                locked_until=nothing,
                lock_owner=nothing,
            )
        )
        self.finish_sql = self._compile(finish)
        #: PostgreSQL: the same, refused (division by zero, SQLSTATE 22012) unless it
        #: updated the row: sent with the COMMIT, it makes the COMMIT fail when the key's
        #: row vanished while the operation ran, so that its work is never kept.
        finished = self._compile(finish.returning(c.id))
        self.finish_checked_sql = f"WITH finished AS ({finished}) SELECT 1 / count(*) FROM finished"
        release = delete(table).where(
            c.id == bindparam("row_id", type_=Integer),
            c.lock_owner == bindparam("lock_owner", type_=String),
        )
        self.release_sql = self._compile(release)
        self.timestamp = processor(c.received_at.type, dialect, bind=True)
        self._json = processor(c.result.type, dialect, bind=False)
        # The lease commits in its own transaction, without waiting for its WAL flush: a
        # crash that loses it loses the request that held it too. The operation's COMMIT
        # flushes the WAL up to it.
        no_flush = "SET LOCAL synchronous_commit TO OFF; "
        #: PostgreSQL, one message: count a replay, lease, commit, begin (with ``begin``,
        #: the lane's BEGIN and timeouts) and read the key's row.
        self.lease_message = (
            f"{no_flush}{self.count_sql}; {self.lease_sql}; COMMIT; {{begin}}{self.read_sql}"
        )
        #: PostgreSQL: the release, committed without a disk flush.
        self.release_message = no_flush + self.release_sql
        self._read_answer = select(
            c.status, c.result, c.response_status, c.response_headers
        ).where(key)

    def release_and_read(self, engine: Any, source: str, event_id: str, row_id: int,
                         owner: str) -> Any:
        """On a fresh connection: free the key if it is still ``owner``'s and in flight
        (waiting for a transaction that is committing it), then read its answer."""
        with engine.begin() as conn:
            conn.exec_driver_sql(self.release_sql, {"row_id": row_id, "lock_owner": owner})
            return conn.execute(
                self._read_answer, {"source": source, "event_id": event_id}
            ).first()

    def release_on(self, engine: Any, row_id: int, owner: str) -> None:
        """Free the key on ``engine`` if its lease is still ``owner``'s."""
        with engine.begin() as conn:
            conn.exec_driver_sql(self.release_sql, {"row_id": row_id, "lock_owner": owner})

    def _compile(self, statement: Any) -> str:
        return compile_statement(statement, self.dialect, _KEY_PARAMETERS)

    def key_row(self, row: tuple[Any, ...] | None) -> KeyRow | None:
        if row is None:
            return None
        row_id, status, owner, fingerprint, result, response_status, headers = row
        return KeyRow(
            row_id, status, owner, fingerprint, self._json(result), response_status,
            self._json(headers),
        )
