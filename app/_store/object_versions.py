"""``object_versions`` (and ``object_version_floors``): the newest version applied per object.

Every statement of freshness (docs/configuration.md#freshness):

- :meth:`FreshStatements.claim_sql` (PostgreSQL): the synchronous claim and the check in
  **one statement**, sent in the round trip of the claim itself::

      INSERT INTO processed_events ... ON CONFLICT (source, event_id) DO UPDATE ...
      RETURNING id, duplicate_count, status, result,
          CASE WHEN duplicate_count = 0
          THEN idemhook_apply_version(<source>, <object>, <version>, <event id>) END

  where ``idemhook_apply_version`` (a PL/pgSQL function, migration 0013) runs the one
  statement that moves the object's version::

      INSERT INTO object_versions AS o (...) SELECT ...
        WHERE NOT EXISTS (<the source's floor is at or above the version>)
      ON CONFLICT (source, object_key) DO UPDATE SET version = excluded.version, ...
        WHERE excluded.version > o.version RETURNING ...

  and answers NULL when it moved it, else the applied event that is at least as new:
  a new event (not a duplicate) that changes nothing is stale. Why a function: written
  out as data-modifying CTEs, the claim and the check cost PostgreSQL about 0.3 ms of
  planning per event, more than the claim itself; a PL/pgSQL function's statements are
  planned once per connection (through a transaction-mode pooler too: nothing is kept
  per client), so the check costs its execution alone.
- :meth:`FreshStatements.check_sql` (PostgreSQL): the same check alone, for an event
  already claimed (``idemhook worker`` applying an asynchronous source's event).
- SQLite (the demo): the same upsert and read as two statements; SQLite has one writer.

**One object at a time, whatever order the commits take.** The upsert locks the object's
row (``ON CONFLICT DO UPDATE`` locks it even when its ``WHERE`` is false), and a second
event of the object waits for the first's transaction, then compares with what it
committed: the newest always wins. Each statement of the function sees every commit
before it (READ COMMITTED, a snapshot per statement), so the newer event it names is the
committed one.

**No deadlocks.** A delivery holds the rows of its objects and the claims of its events
until it commits. A batch applies its events in the order of their object keys
(:func:`app.freshness.in_version_order`), as ``idemhook worker`` does its batches. And
the claim of a batch source's delivery is preceded, in the same message, by the
object's transaction-level advisory lock (a 64-bit hash of the source and the object
key; source names hold no newline): were the object's row locked only by the upsert, a
batch holding an object could wait for the claim of one of its events that another
delivery, waiting for the object, holds. (Two keys whose hashes collide, about one pair
in 2^64, could still deadlock: PostgreSQL detects it and the provider's retry mends it.)

Also here: reading an object (``idemhook objects show``), moving its version on purpose
(``events replay --force``), and pruning old rows, which raises the source's floor to
the newest version pruned, in a transaction that commits before the rows are deleted,
so that an event at or below it can never apply afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from idemhook._config.freshness import Versioned
from idemhook._store.models import object_version_floors as FLOORS
from idemhook._store.models import object_versions as TABLE
from idemhook._store.models import processed_events as EVENTS

#: The object's lock key: source names hold no newline, so no two objects share a text.
_LOCK_KEY = "hashtextextended({source} || chr(10) || {object_key}, 0)"
#: The object's advisory lock (a batch source's claims; replays).
LOCK_PG = (
    "SELECT pg_advisory_xact_lock("
    + _LOCK_KEY.format(source="%(source)s", object_key="%(object_key)s")
    + "); "
)
#: The check (migration 0013); ``{source}``: the source's name as a literal (names are
#: [A-Za-z0-9_.-], app.sources): one placeholder fewer for psycopg2 to parse per event.
_APPLY_PG = (
    "idemhook_apply_version({source}, %(object_key)s, CAST(%(version)s AS numeric), %(event_id)s)"
)

_UPSERT_SQLITE = (
    "INSERT INTO object_versions (source, object_key, version, event_id, applied_at) "
    "SELECT :source, :object_key, :version, :event_id, :applied_at WHERE NOT EXISTS "
    "(SELECT 1 FROM object_version_floors f WHERE f.source = :source "
    "AND f.version >= :version) "
    "ON CONFLICT (source, object_key) DO UPDATE SET version = excluded.version, "
    "event_id = excluded.event_id, applied_at = excluded.applied_at "
    "WHERE excluded.version > object_versions.version RETURNING 1"
)
_NEWER_SQLITE = (
    "SELECT coalesce((SELECT v.event_id FROM object_versions v WHERE v.source = :source "
    "AND v.object_key = :object_key AND v.version >= :version), "
    "(SELECT f.event_id FROM object_version_floors f WHERE f.source = :source "
    "AND f.version >= :version))"
)


class FreshStatements:
    """The freshness statements for one dialect, written once (see the module docstring).

    ``claim_sql`` is the claim's own ``INSERT ... RETURNING`` (:mod:`idemhook._store.statements`),
    which the PostgreSQL statement wraps.
    """

    def __init__(self, dialect: Any, claim_sql: str, timestamp: Callable[[Any], Any]) -> None:
        self.postgresql = dialect.name == "postgresql"
        self._timestamp = timestamp
        self._claim_sql = claim_sql
        #: Per source (its name is a literal in them): the claim's and the check's statements.
        self._claims: dict[str, str] = {}
        self._checks: dict[str, str] = {}

    def claim_sql(self, source: str, *, lock: bool = False) -> str:
        """PostgreSQL: the claim and the check in one statement, for ``source``.

        Returns the claim's columns, then None when the object's version moved to this
        event, else the applied event at least as new ('' if none is recorded); None for
        a duplicate too (whose claim changed nothing else). ``lock``: take the object's
        advisory lock first, in the same message (a batch source's claims).
        """
        key = f"{source}+lock" if lock else source
        sql = self._claims.get(key)
        if sql is None:
            literal = f"'{source}'"
            claim = self._claim_sql.replace("%(source)s", literal)
            returning = " RETURNING processed_events.id, processed_events.duplicate_count"
            if returning not in claim:
                raise RuntimeError(f"the claim's RETURNING is not what this wraps: {claim}")
            sql = (
                f"{claim}, CASE WHEN processed_events.duplicate_count = 0 THEN "
                + _APPLY_PG.replace("{source}", literal)
                + " END"
            )
            if lock:
                sql = LOCK_PG.replace("%(source)s", literal) + sql
            if len(self._claims) < 1024:
                self._claims[key] = sql
        return sql

    def check_sql(self, source: str) -> str:
        """PostgreSQL: the check of an event already claimed, for ``source``; one row:
        None when the object's version moved to this event, else the newer event."""
        sql = self._checks.get(source)
        if sql is None:
            sql = "SELECT " + _APPLY_PG.replace("{source}", f"'{source}'")
            if len(self._checks) < 1024:
                self._checks[source] = sql
        return sql

    def params(self, source: str, event_id: str, versioned: Versioned) -> dict[str, Any]:
        """The parameters the check adds to the claim's."""
        if self.postgresql:
            return {"object_key": versioned.object_key, "version": versioned.version}
        return {
            "source": source,
            "event_id": event_id,
            "object_key": versioned.object_key,
            "version": sqlite_number(versioned.version),
            "applied_at": self._timestamp(datetime.now(UTC)),
        }

    def check(self, lane: Any, source: str, event_id: str, versioned: Versioned) -> Stale | None:
        """Move the object's version to this claimed event's if it is newer (the worker's, and
        the SQLite claim's check); a :class:`Stale` naming the newer event if not."""
        params = self.params(source, event_id, versioned)
        if self.postgresql:
            params["event_id"] = event_id
            [newer] = lane.execute(self.check_sql(source), params).fetchone()
            return None if newer is None else Stale(newer or None)
        # fetchall: SQLite finishes an INSERT ... RETURNING only once its rows are all read.
        if lane.execute(_UPSERT_SQLITE, params).fetchall():
            return None
        [(newer,)] = lane.execute(_NEWER_SQLITE, params).fetchall()
        return Stale(newer)


@dataclass(frozen=True, slots=True)
class Stale:
    """The check's finding: the event is not newer than what its object holds."""

    #: The applied event at or above its version (None only if the rows were edited by hand).
    newer: str | None


def sqlite_number(version: int | Decimal) -> int | float:
    """A version as SQLite stores a ``NUMERIC`` (the demo: 15 significant digits for fractions)."""
    if version == int(version) and abs(version) < 2**63:
        return int(version)
    return float(version)


# -- operators: show, move, prune -------------------------------------------------------------


def show(conn: Connection, source: str, object_key: str) -> dict[str, Any] | None:
    """The object's row with its event's status, and the source's floor; None if neither."""
    row = conn.execute(
        select(TABLE.c.version, TABLE.c.event_id, TABLE.c.applied_at, EVENTS.c.status)
        .select_from(
            TABLE.outerjoin(
                EVENTS,
                and_(EVENTS.c.source == TABLE.c.source, EVENTS.c.event_id == TABLE.c.event_id),
            )
        )
        .where(TABLE.c.source == source, TABLE.c.object_key == object_key)
    ).first()
    floor = conn.execute(
        select(FLOORS.c.version, FLOORS.c.event_id, FLOORS.c.pruned_at).where(
            FLOORS.c.source == source
        )
    ).first()
    if row is None and floor is None:
        return None
    found: dict[str, Any] = {"source": source, "object_key": object_key}
    if row is not None:
        found |= {
            "version": _decimal(row.version),
            "event_id": row.event_id,
            "applied_at": row.applied_at,
            "event_status": row.status,
        }
    else:
        found |= {"version": None, "event_id": None, "applied_at": None, "event_status": None}
    found["floor"] = (
        None
        if floor is None
        else {
            "version": _decimal(floor.version),
            "event_id": floor.event_id,
            "pruned_at": floor.pruned_at,
        }
    )
    return found


def lock(conn: Connection, source: str, object_key: str) -> None:
    """Take the object's lock for ``conn``'s transaction (PostgreSQL; SQLite has one writer)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(LOCK_PG.rstrip("; "), {"source": source, "object_key": object_key})


def newer_than(
    conn: Connection, source: str, object_key: str, version: Decimal, event_id: str
) -> tuple[str, Decimal] | None:
    """The applied event that makes ``event_id`` (at ``version``) stale, with its version.

    The object's row if it holds a larger version, or this one under another event ID;
    else the source's floor if it is at or above ``version``; else None.
    """
    bound: Any = version if conn.dialect.name == "postgresql" else sqlite_number(version)
    row = conn.execute(
        select(TABLE.c.event_id, TABLE.c.version).where(
            TABLE.c.source == source,
            TABLE.c.object_key == object_key,
            or_(
                TABLE.c.version > bound,
                and_(TABLE.c.version == bound, TABLE.c.event_id != event_id),
            ),
        )
    ).first()
    if row is None:
        row = conn.execute(
            select(FLOORS.c.event_id, FLOORS.c.version).where(
                FLOORS.c.source == source, FLOORS.c.version >= bound
            )
        ).first()
    return None if row is None else (row.event_id, _decimal(row.version))


def move(conn: Connection, source: str, object_key: str, version: Decimal, event_id: str) -> None:
    """Make ``event_id`` the object's applied version, whatever it was (a forced replay)."""
    dialect = conn.dialect.name
    bound: Any = version if dialect == "postgresql" else sqlite_number(version)
    values = {
        "source": source,
        "object_key": object_key,
        "version": bound,
        "event_id": event_id,
        "applied_at": datetime.now(UTC),
    }
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(TABLE).values(values)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[TABLE.c.source, TABLE.c.object_key],
            set_={
                "version": statement.excluded.version,
                "event_id": statement.excluded.event_id,
                "applied_at": statement.excluded.applied_at,
            },
        )
    )


@dataclass(slots=True)
class PruneReport:
    """What ``objects prune`` did (or, with ``dry_run``, would do)."""

    cutoff: datetime
    dry_run: bool
    objects: int = 0
    batches: int = 0
    #: Per source, the floor after the prune (its newest pruned version).
    floors: dict[str, Decimal] = field(default_factory=dict)


#: Raise each source's floor to the newest version among the rows about to be pruned;
#: committed before they are deleted.
_RAISE_FLOORS_PG = (
    "INSERT INTO object_version_floors AS f (source, version, event_id, pruned_at) "
    "SELECT DISTINCT ON (o.source) o.source, o.version, o.event_id, now() "
    "FROM object_versions o JOIN unnest(CAST(%(sources)s AS text[]), "
    "CAST(%(keys)s AS text[])) AS c(source, object_key) "
    "ON o.source = c.source AND o.object_key = c.object_key "
    "ORDER BY o.source, o.version DESC "
    "ON CONFLICT (source) DO UPDATE SET version = excluded.version, "
    "event_id = excluded.event_id, pruned_at = excluded.pruned_at "
    "WHERE excluded.version > f.version"
)
#: Delete those rows still old and at or below their floor; rows an event holds right
#: now (locked) are left for the next prune.
_DELETE_PG = (
    "DELETE FROM object_versions WHERE ctid IN (SELECT o.ctid FROM object_versions o "
    "JOIN unnest(CAST(%(sources)s AS text[]), CAST(%(keys)s AS text[])) AS c(source, "
    "object_key) ON o.source = c.source AND o.object_key = c.object_key "
    "JOIN object_version_floors f ON f.source = o.source "
    "WHERE o.applied_at < %(cutoff)s AND o.version <= f.version "
    "FOR UPDATE OF o SKIP LOCKED)"
)


def prune(
    engine: Engine,
    cutoff: datetime,
    *,
    source: str | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
) -> PruneReport:
    """Delete the rows of objects last applied before ``cutoff``, raising their floors.

    Walks the primary key once, ``batch_size`` rows at a time. For each batch, the floor
    of each source rises to the newest version among its rows, in a transaction that
    commits first; then the rows are deleted. A check that inserts a row for an object
    pruned meanwhile sees that floor and takes its row back (migration 0013's function),
    so no event at or below the floor applies. On PostgreSQL a row an event holds at that
    moment is skipped, for the next prune.
    """
    report = PruneReport(cutoff, dry_run)
    old = TABLE.c.applied_at < cutoff
    if source is not None:
        old = and_(old, TABLE.c.source == source)
    if dry_run:
        with engine.connect() as conn:
            report.objects = conn.execute(
                select(func.count()).select_from(TABLE).where(old)
            ).scalar_one()
        return report
    after: tuple[str, str] | None = None
    while True:
        page = select(TABLE.c.source, TABLE.c.object_key).where(old)
        if after is not None:
            page = page.where(tuple_(TABLE.c.source, TABLE.c.object_key) > tuple_(*after))
        with engine.begin() as conn:
            rows = conn.execute(
                page.order_by(TABLE.c.source, TABLE.c.object_key).limit(batch_size)
            ).all()
            if rows:
                _raise_floors(conn, rows)
        if not rows:
            break
        after = (rows[-1].source, rows[-1].object_key)
        with engine.begin() as conn:
            report.objects += _delete(conn, rows, cutoff)
        report.batches += 1
        if len(rows) < batch_size:
            break
    with engine.connect() as conn:
        floors = conn.execute(select(FLOORS.c.source, FLOORS.c.version)).all()
    report.floors = {row.source: _decimal(row.version) for row in floors}
    return report


def _raise_floors(conn: Connection, rows: list[Any]) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_RAISE_FLOORS_PG, _keys(rows))
        return
    for row in rows:
        found = conn.execute(
            select(TABLE.c.version, TABLE.c.event_id).where(
                TABLE.c.source == row.source, TABLE.c.object_key == row.object_key
            )
        ).first()
        if found is None:
            continue
        floor = conn.execute(select(FLOORS.c.version).where(FLOORS.c.source == row.source)).first()
        values = {
            "version": found.version,
            "event_id": found.event_id,
            "pruned_at": datetime.now(UTC),
        }
        if floor is None:
            conn.execute(FLOORS.insert().values(source=row.source, **values))
        elif found.version > floor.version:
            conn.execute(FLOORS.update().where(FLOORS.c.source == row.source).values(values))


def _delete(conn: Connection, rows: list[Any], cutoff: datetime) -> int:
    if conn.dialect.name == "postgresql":
        return conn.exec_driver_sql(_DELETE_PG, {**_keys(rows), "cutoff": cutoff}).rowcount
    deleted = 0
    for row in rows:
        floor = select(FLOORS.c.version).where(FLOORS.c.source == row.source).scalar_subquery()
        deleted += conn.execute(
            TABLE.delete().where(
                TABLE.c.source == row.source,
                TABLE.c.object_key == row.object_key,
                TABLE.c.applied_at < cutoff,
                TABLE.c.version <= floor,
            )
        ).rowcount
    return deleted


def _keys(rows: list[Any]) -> dict[str, list[str]]:
    return {"sources": [r.source for r in rows], "keys": [r.object_key for r in rows]}


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, Decimal):
        return value
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
