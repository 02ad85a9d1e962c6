"""The statements of an ``idempotency-key`` request (:mod:`idemhook._engine.keys`), compiled
once per dialect: count a replay, lease the key, read it, finish, release."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    not_,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from idemhook._store.models import processed_events
from idemhook._store.statements import compile_statement, processor
from idemhook._values.outcome import Status

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
        "ttl_seconds",
        "lease_seconds",
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
        #: PostgreSQL: every time of a lease is the server's (``now()``, the lease message's
        #: one transaction time, plus or minus seconds passed as numbers), so that
        #: instances' clocks never meet and psycopg2 quotes no timestamp (about 30,000
        #: instructions each; docs/performance.md). SQLite: the request's own clock.
        self.server_clock = dialect.name == "postgresql"
        if self.server_clock:
            now: Any = func.now()
            second = literal_column("interval '1 second'")
            ttl = bindparam("ttl_seconds", type_=Float) * second
            cutoff: Any = now - ttl
            expires_at: Any = now + ttl
            locked_until: Any = now + bindparam("lease_seconds", type_=Float) * second
            processed_at: Any = func.clock_timestamp()
        else:
            now = bindparam("now", type_=String)
            cutoff = bindparam("cutoff", type_=String)
            expires_at = bindparam("expires_at", type_=String)
            locked_until = bindparam("locked_until", type_=String)
            processed_at = bindparam("processed_at", type_=String)
        # Rows claimed before key expiry existed have no expires_at: received_at + key_ttl.
        unexpired = func.coalesce(c.expires_at > now, c.received_at > cutoff)
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
            expires_at=expires_at,
            locked_until=locked_until,
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
                processed_at=processed_at,
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
        #: PostgreSQL, one message (``Lane.execute_committing``): count a replay, lease,
        #: commit, and read the key's row in the message's own transaction. The operation's
        #: transaction begins with its first statement, so a replay ends with this message.
        self.lease_message = (
            f"{no_flush}{self.count_sql}; {self.lease_sql}; COMMIT; {self.read_sql}"
        )
        #: PostgreSQL: the release, committed without a disk flush.
        self.release_message = no_flush + self.release_sql
        self._read_answer = select(c.status, c.result, c.response_status, c.response_headers).where(
            key
        )

    def release_and_read(
        self, engine: Any, source: str, event_id: str, row_id: int, owner: str
    ) -> Any:
        """On a fresh connection: free the key if it is still ``owner``'s and in flight
        (waiting for a transaction that is committing it), then read its answer."""
        with engine.begin() as conn:
            conn.exec_driver_sql(self.release_sql, {"row_id": row_id, "lock_owner": owner})
            return conn.execute(self._read_answer, {"source": source, "event_id": event_id}).first()

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
            row_id,
            status,
            owner,
            fingerprint,
            self._json(result),
            response_status,
            self._json(headers),
        )
