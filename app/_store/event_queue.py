"""``event_queue`` (and the claims it points at) as the worker's applier sees it.

Every statement :class:`idemhook._engine.applier.Applier` runs: take due events (``FOR UPDATE OF q
SKIP LOCKED``, order keys' heads only), count and give back takes (``interruptions``),
record a failed attempt and when it is due again, and the statements sent with a batch's
COMMIT. The applier holds the policy (batches, interruptions, backoff) and no SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Engine,
    Float,
    Integer,
    String,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)

from idemhook._store.lanes import Lane, Lanes
from idemhook._store.models import (
    delivery_failures,
    event_queue,
    processed_events,
    source_pauses,
)
from idemhook._store.statements import ClaimStatements, compile_statement, processor


class EventQueue:
    """The applier's statements for one dialect and one set of sources, compiled once."""

    def __init__(self, dialect: Any, sources: Sequence[str]) -> None:
        self.postgresql = dialect.name == "postgresql"
        self.claims = ClaimStatements(dialect)
        self.timestamp = processor(processed_events.c.received_at.type, dialect, bind=True)
        names = sorted(sources)
        self._take_sql = _compile(_take(names, self.postgresql), dialect)
        self._next_due_sql = _compile(_next_due(names, self.postgresql), dialect)
        counted, due = _attempted(self.postgresql)
        self._counted_sql, self._due_sql = _compile(counted, dialect), _compile(due, dialect)
        #: PostgreSQL: both in one message.
        self._counted_and_due_sql = "; ".join((self._counted_sql, self._due_sql))
        self._dequeue_sql = _compile(_dequeue(), dialect)
        self._lock_sql = _compile(_lock(), dialect)

    def take(self, lane: Lane, limit: int) -> list[Any]:
        """Due events, at most ``limit``, locked for this transaction (PostgreSQL: each row
        ends with the backend's pid, the session that holds the locks)."""
        params: dict[str, Any] = {"limit": limit}
        if not self.postgresql:  # PostgreSQL compares with its own now()
            params["now"] = self.timestamp(datetime.now(UTC))
        return lane.execute(self._take_sql, params).fetchall()

    def count_takes(self, lanes: Lanes, ids: Sequence[int]) -> None:
        """Count the takes of events about to run, committed at once (PostgreSQL)."""
        with lanes.lane() as side:
            side.execute_alone(_COUNT_TAKES_PG, {"ids": list(ids)})

    def give_back_takes(self, lanes: Lanes, ids: Sequence[int]) -> None:
        """Take back counted takes of a batch lost to an error, never below 0 (PostgreSQL)."""
        with lanes.lane() as side:
            side.execute_alone(_GIVE_BACK_PG, {"ids": list(ids)})

    def lock(self, lane: Lane, row_id: int) -> None:
        """Wait (up to the lock timeout) for the event's queue row, and hold it."""
        lane.execute(self._lock_sql, {"row_id": row_id})

    def attempt_failed(
        self, lane: Lane, row_id: int, status: str, result: str | None, delay: float | None
    ) -> None:
        """Count a failed attempt: ``failed`` at the limit, else due again after ``delay``."""
        params: dict[str, Any] = {
            "row_id": row_id,
            "status": status,
            "result": result,
            "delay": delay or 0.0,
        }
        if not self.postgresql:  # PostgreSQL: now() + the delay, its own clock
            due = datetime.now(UTC).timestamp() + (delay or 0.0)
            params["next_attempt_at"] = self.timestamp(datetime.fromtimestamp(due, UTC))
        if delay is None:
            lane.execute(self._counted_sql, params)
        elif self.postgresql:
            lane.execute(self._counted_and_due_sql, params)
        else:
            lane.execute(self._counted_sql, params)
            lane.execute(self._due_sql, params)

    def closing(
        self,
        lane: Lane,
        *,
        failures: list[dict[str, Any]],
        counted: Sequence[int],
        done: Sequence[int],
        stored: Sequence[tuple[int, str, str]],
    ) -> tuple[str | None, dict[str, Any] | None]:
        """The statements sent with a batch's COMMIT, and their parameters.

        The failure rows are written first, in the same transaction; then (one
        message on PostgreSQL) the counted takes are taken back, finished events
        leave the queue and their results are stored, ``processed_at`` the time of
        the commit (``clock_timestamp()``).
        """
        if failures:
            lane.joined().execute(insert(delivery_failures), failures)
        if not stored and not done and not counted:
            return None, None
        if self.postgresql:
            params = {
                "counted": list(counted),
                "done": list(done),
                "ids": [row_id for row_id, _, _ in stored],
                "statuses": [status for _, status, _ in stored],
                "results": [result for _, _, result in stored],
            }
            return _FINISH_PG, params
        for row_id in done:
            lane.execute(self._dequeue_sql, {"row_id": row_id})
        if not stored:
            return None, None
        rows = [self.claims.result_row(i, status, text) for i, status, text in stored]  # type: ignore[arg-type]
        # One statement per result: SQLite has no column list for a VALUES alias, which the
        # claim's multi-row statement uses (PostgreSQL's batches go through _FINISH_PG).
        for row in rows[:-1]:
            lane.execute(self.claims.finish_sql, row)
        return self.claims.finish_sql, rows[-1]

    def next_due(self, lanes: Lanes) -> float | None:
        """Seconds until the earliest event due later falls due (None: none)."""
        with lanes.lane() as lane:
            if lane.pipelined:  # seconds from PostgreSQL's now()
                [(seconds,)] = lane.execute_alone(self._next_due_sql).fetchall()
                return None if seconds is None else max(0.0, float(seconds))
            now = datetime.now(UTC)
            lane.begin()
            try:
                row = lane.execute(self._next_due_sql, {"now": self.timestamp(now)}).fetchone()
            finally:
                lane.rollback()
        due = row[0] if row else None
        if due is None:
            return None
        if isinstance(due, str):
            due = datetime.fromisoformat(due)
        if due.tzinfo is None:
            due = due.replace(tzinfo=UTC)
        return max(0.0, (due - now).total_seconds())


def end_backend(engine: Engine, pid: int) -> None:
    """End the PostgreSQL session ``pid`` (its transaction rolls back, its locks go)."""
    with engine.connect() as conn:
        conn.execute(select(func.pg_terminate_backend(pid)))


def _take(sources: list[str], postgresql: bool) -> Any:
    q = event_queue.alias("q")
    p = event_queue.alias("p")
    e = processed_events.alias("e")
    earlier = exists().where(
        p.c.source == q.c.source,
        p.c.order_key == q.c.order_key,
        p.c.id < q.c.id,
    )
    # A paused source's events wait for `idemhook sources resume`. NOT IN, not NOT EXISTS:
    # PostgreSQL keeps it a filter over a hashed subplan read once per take, where an
    # anti-join over the (small, rarely analysed) pauses table changed the take's plan
    # into a sort of the whole queue (tests/test_applying.py reads the plan).
    paused = q.c.source.in_(select(source_pauses.c.source).scalar_subquery())
    columns = [
        q.c.id,
        e.c.source,
        e.c.event_id,
        e.c.event_type,
        e.c.payload,
        e.c.headers,
        e.c.received_at,
        e.c.attempts,
        e.c.interruptions,
        e.c.tenant,
    ]
    if postgresql:  # the session holding the locks, in case a handler overruns
        columns.append(func.pg_backend_pid())
    take = (
        select(*columns)
        .select_from(q.join(e, e.c.id == q.c.id))
        .where(
            q.c.next_attempt_at <= (func.now() if postgresql else bindparam("now", type_=String)),
            _among(q.c.source, sources),
            or_(q.c.order_key.is_(None), ~earlier),
            ~paused,
        )
        .order_by(q.c.next_attempt_at, q.c.id)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True, of=q)
    )
    # SQLite's LIMIT wants an OFFSET, which would otherwise be a parameter of its own.
    return take if postgresql else take.offset(literal_column("0"))


def _lock() -> Any:
    q = event_queue
    return select(q.c.id).where(q.c.id == bindparam("row_id", type_=Integer)).with_for_update()


def _next_due(sources: list[str], postgresql: bool) -> Any:
    q = event_queue
    if postgresql:
        earliest = func.min(q.c.next_attempt_at)
        return select(func.extract("epoch", earliest - func.now())).where(
            q.c.next_attempt_at > func.now(), _among(q.c.source, sources)
        )
    return select(func.min(q.c.next_attempt_at)).where(
        q.c.next_attempt_at > bindparam("now", type_=String),
        _among(q.c.source, sources),
    )


def _attempted(postgresql: bool) -> tuple[Any, Any]:
    """A failed attempt: counted on the event (``failed`` at the limit); when due again."""
    t = processed_events
    counted = (
        update(t)
        .where(t.c.id == bindparam("row_id", type_=Integer))
        .values(
            attempts=t.c.attempts + literal_column("1"),
            status=bindparam("status", type_=String),
            result=bindparam("result", type_=String),
        )
    )
    q = event_queue
    if postgresql:  # now() + make_interval(0, ..., secs => delay)
        zero = literal_column("0")
        delay = func.make_interval(zero, zero, zero, zero, zero, zero, bindparam("delay", Float))
        when: Any = func.now() + delay
    else:
        when = bindparam("next_attempt_at", type_=String)
    due = update(q).where(q.c.id == bindparam("row_id", type_=Integer)).values(next_attempt_at=when)
    return counted, due


def _dequeue() -> Any:
    q = event_queue
    return delete(q).where(q.c.id == bindparam("row_id", type_=Integer))


def _among(column: Any, names: list[str]) -> Any:
    # Source names are [A-Za-z0-9_.-] (app.sources): written into the SQL, compiled once.
    return column.in_([literal_column(f"'{name}'") for name in names])


def _compile(statement: Any, dialect: Any) -> str:
    return compile_statement(statement, dialect, _PARAMETERS)


#: The parameters the worker's statements are given.
_PARAMETERS = frozenset({"now", "limit", "row_id", "status", "result", "delay", "next_attempt_at"})
#: Sent with a batch's COMMIT: its counted takes taken back; its finished events leave the
#: queue; their results stored.
_FINISH_PG = (
    "UPDATE processed_events SET interruptions = interruptions - 1 "
    "WHERE id = ANY(CAST(%(counted)s AS bigint[])); "
    "DELETE FROM event_queue WHERE id = ANY(%(done)s); "
    "UPDATE processed_events AS e SET status = v.status, result = CAST(v.result AS jsonb), "
    "processed_at = clock_timestamp() "
    "FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(statuses)s AS text[]), "
    "CAST(%(results)s AS text[])) AS v(id, status, result) WHERE e.id = v.id"
)


#: A batch's takes, counted in a transaction of their own before its handlers run.
_COUNT_TAKES_PG = (
    "UPDATE processed_events SET interruptions = interruptions + 1 "
    "WHERE id = ANY(CAST(%(ids)s AS bigint[]))"
)


#: Takes of a batch lost to an error (not to the worker's end), given back; never below 0.
_GIVE_BACK_PG = (
    "UPDATE processed_events SET interruptions = GREATEST(interruptions - 1, 0) "
    "WHERE id = ANY(CAST(%(ids)s AS bigint[]))"
)
