"""``rejected_deliveries`` and ``source_pauses``: every statement about refusals and pauses.

**The cap.** A refusal is one statement, which picks its row's ``slot`` from the rows
of its source and minute already there, and never more than the cap plus one::

    INSERT INTO rejected_deliveries (..., minute, slot, count)
    SELECT ..., :minute, LEAST(COALESCE(MAX(slot), 0) + 1, :cap + 1), 1
      FROM rejected_deliveries WHERE source = :source AND minute = :minute
    ON CONFLICT (source, minute, slot) DO UPDATE SET count = rejected_deliveries.count + 1

Why it holds under any concurrency (several processes, threads, instances): ``slot``
is always between 1 and cap + 1 and ``(source, minute, slot)`` is unique, so a source
never has more than cap + 1 rows in a minute, whatever two statements read at once.
Two refusals that read the same ``MAX(slot)`` pick the same slot; the second waits on
the unique index for the first to commit and then adds itself to that row's ``count``
instead. So every refusal is counted exactly once (the sum of ``count`` is the number
of refusals), the rows of slots 1 to cap each describe one refusal (or, after such a
race, that refusal and ``count - 1`` more at the same moment), and slot cap + 1, the
minute's last row, describes the first refusal past the cap and counts all of them.
No lock is taken but the row lock of the conflict itself; the statement reads at most
cap + 1 index entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, delete, func, select, text
from sqlalchemy.orm import Session

from idemhook._store.lanes import Lanes
from idemhook._store.models import Timestamp, event_queue, rejected_deliveries, source_pauses
from idemhook._store.notify import EVENTS_CHANNEL, notify_sql
from idemhook._values.jsontext import dumps

REJECTIONS = rejected_deliveries
PAUSES = source_pauses

_COLUMNS = (
    "source, tenant, error, status_code, message, received_at, minute, slot, count, "
    "client_addr, user_agent, body_bytes, body_sha256, headers"
)
_INSERT_PG = (
    f"INSERT INTO rejected_deliveries AS r ({_COLUMNS}) "
    "SELECT %(source)s, %(tenant)s, %(error)s, %(status_code)s, %(message)s, "
    "%(received_at)s, %(minute)s, LEAST(COALESCE(MAX(slot), 0) + 1, %(cap)s + 1), 1, "
    "%(client_addr)s, %(user_agent)s, %(body_bytes)s, %(body_sha256)s, "
    "CAST(%(headers)s AS jsonb) "
    "FROM rejected_deliveries WHERE source = %(source)s AND minute = %(minute)s "
    "ON CONFLICT (source, minute, slot) DO UPDATE SET count = r.count + 1"
)
_INSERT_SQLITE = text(
    "INSERT INTO rejected_deliveries AS r (source, tenant, error, status_code, message, "
    "received_at, minute, slot, count, client_addr, user_agent, body_bytes, body_sha256, "
    "headers) "
    "SELECT :source, :tenant, :error, :status_code, :message, :received_at, :minute, "
    "MIN(COALESCE(MAX(slot), 0) + 1, :cap + 1), 1, :client_addr, :user_agent, :body_bytes, "
    ":body_sha256, :headers "
    "FROM rejected_deliveries WHERE source = :source AND minute = :minute "
    "ON CONFLICT (source, minute, slot) DO UPDATE SET count = r.count + 1"
).bindparams(
    bindparam("received_at", type_=Timestamp),
    bindparam("minute", type_=Timestamp),
)


def _iso(value: datetime) -> str:
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def minute_of(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def record_rejection(lanes: Lanes, engine: Engine, row: dict[str, Any], cap: int) -> None:
    """Write one refusal, within the cap of its source and minute (the module docstring)."""
    params = {**row, "minute": minute_of(row["received_at"]), "cap": cap}
    params["headers"] = dumps(row["headers"]) if row.get("headers") is not None else None
    if engine.dialect.name == "postgresql":
        with lanes.lane() as lane:
            lane.execute_alone(_INSERT_PG, params)
        return
    with engine.begin() as conn:
        conn.execute(_INSERT_SQLITE, params)


def prune_rejections(engine: Engine, cutoff: datetime, *, batch_size: int, dry_run: bool) -> int:
    """Delete refusals received before ``cutoff``, one short transaction per batch."""
    old = REJECTIONS.c.received_at < cutoff
    if dry_run:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(REJECTIONS).where(old))
                       .scalar() or 0)  # fmt: skip
    deleted = 0
    while True:
        batch = select(REJECTIONS.c.id).where(old).limit(batch_size).scalar_subquery()
        with engine.begin() as conn:
            done = conn.execute(delete(REJECTIONS).where(REJECTIONS.c.id.in_(batch))).rowcount
        deleted += done
        if done < batch_size:
            return deleted


# -- pauses ------------------------------------------------------------------------------------

_PAUSE = text(
    "INSERT INTO source_pauses (source, paused_at, paused_by, reason) "
    "VALUES (:source, :paused_at, :paused_by, :reason) ON CONFLICT (source) DO NOTHING"
).bindparams(bindparam("paused_at", type_=Timestamp))
_PAUSED_SQL = "SELECT source FROM source_pauses"


def pause(engine: Engine, source: str, at: datetime, by: str | None, reason: str | None) -> bool:
    """Pause ``source``; False if it was paused already."""
    with engine.begin() as conn:
        done = conn.execute(
            _PAUSE, {"source": source, "paused_at": at, "paused_by": by, "reason": reason}
        )
        return bool(done.rowcount)


def resume(engine: Engine, source: str) -> bool:
    """Resume ``source`` and wake the workers (PostgreSQL); False if it was not paused."""
    with engine.begin() as conn:
        done = bool(conn.execute(delete(PAUSES).where(PAUSES.c.source == source)).rowcount)
        if done and engine.dialect.name == "postgresql":
            conn.exec_driver_sql(notify_sql(EVENTS_CHANNEL))
        return done


def paused_sources(lanes: Lanes, engine: Engine) -> frozenset[str]:
    """The names of the paused sources (one short statement; PostgreSQL: on a claim lane)."""
    if engine.dialect.name == "postgresql":
        with lanes.lane() as lane:
            return frozenset(name for (name,) in lane.execute_alone(_PAUSED_SQL).fetchall())
    with engine.connect() as conn:
        return frozenset(name for (name,) in conn.exec_driver_sql(_PAUSED_SQL))


def held(engine: Engine) -> bool:
    """Whether a source is paused or any received event waits (a worker has work)."""
    query = select(select(PAUSES.c.source).exists() | select(event_queue.c.id).exists())
    with engine.connect() as conn:
        return bool(conn.execute(query).scalar())


def pauses_at(url: Any) -> dict[str, dict[str, Any]]:
    """Every pause in the database at ``url`` (a short-lived engine: ``idemhook sources``)."""
    postgresql = str(url).startswith("postgresql")
    engine = create_engine(url, connect_args={"connect_timeout": 3} if postgresql else {})
    try:
        return pauses(engine)
    finally:
        engine.dispose()


def pauses(session: Session | Engine) -> dict[str, dict[str, Any]]:
    """Every pause, by source: when, by whom and why."""
    query = select(PAUSES)
    if isinstance(session, Engine):
        with session.connect() as conn:
            rows: Iterable[Any] = conn.execute(query).all()
    else:
        rows = session.execute(query).all()
    return {
        row.source: {"paused_at": _iso(row.paused_at), "by": row.paused_by, "reason": row.reason}
        for row in rows
    }
