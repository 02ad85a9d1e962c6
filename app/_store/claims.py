"""``processed_events`` claims: the asynchronous acknowledgement's statement, what the
fault bracket reads back (what committed, for a delivery's events), and which events a
reconcile run finds already claimed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, select, tuple_

from idemhook._store.models import processed_events

#: First key of the order keys' advisory locks, so they never meet an application's own.
ORDER_LOCK_SPACE = 0x69646D68  # "idmh"

#: The claim of a delivery's new events and their queue rows, in one statement (a
#: data-modifying CTE, ``queued``, runs whether or not it is referenced). The events come
#: as one JSON parameter, ``{"h": headers, "e": [[id, type, payload, order key], ...]}``:
#: psycopg2 spends about 10,000 instructions on each parameter it quotes, so four per
#: event cost more than the JSON text (whose parts are written once each, below).
#: ``ORDER BY n``: ids are drawn in the delivery's order (receipt order per order key).
#: ``{via_column}``/``{via_value}``: empty for a delivery (``received_via`` keeps its default),
#: ``, received_via``/``, 'reconcile'`` for the events a reconcile run recovered;
#: ``{tenant_column}``/``{tenant_value}``: empty but for a tenant's delivery, whose document
#: also holds ``"t"``, the tenant.
ACCEPT_PG = (
    "WITH d AS (SELECT CAST(%(d)s AS jsonb) AS d), "
    "claimed AS (INSERT INTO processed_events AS e (source, event_id, event_type, "
    "status, received_at, payload, headers, duplicate_count, last_seen_at, replay_count, "
    "order_key{via_column}{tenant_column}) SELECT {source}, a.x->>0, a.x->>1, 'received', "
    "now(), a.x->2, d.d->'h', 0, now(), 0, a.x->>3{via_value}{tenant_value} "
    "FROM d, jsonb_array_elements(d.d->'e') WITH ORDINALITY AS a(x, n) "
    "ORDER BY a.n "
    "ON CONFLICT (source, event_id) DO UPDATE SET "
    "duplicate_count = e.duplicate_count + 1, last_seen_at = excluded.last_seen_at "
    "RETURNING e.id, e.source, e.event_id, e.duplicate_count, e.status, e.result, "
    "e.order_key, e.received_at), "
    "queued AS (INSERT INTO event_queue (id, source, order_key, next_attempt_at, received_at) "
    "SELECT id, source, order_key, received_at, received_at FROM claimed "
    "WHERE duplicate_count = 0) "
    "SELECT event_id, duplicate_count, status, result FROM claimed"
)


def accept_sql(source: str, *, recovered: bool = False, tenant: bool = False) -> str:
    """:data:`ACCEPT_PG` for ``source`` (a checked name, [A-Za-z0-9_.-]: a literal)."""
    via = (", received_via", ", 'reconcile'") if recovered else ("", "")
    tenant_ = (", tenant", ", d.d->>'t'") if tenant else ("", "")
    return ACCEPT_PG.format(
        source=f"'{source}'",
        via_column=via[0],
        via_value=via[1],
        tenant_column=tenant_[0],
        tenant_value=tenant_[1],
    )


def known_event_ids(engine: Engine, source: str, event_ids: Sequence[str]) -> set[str]:
    """Which of ``event_ids`` have a claim of ``source`` (through the unique index)."""
    if not event_ids:
        return set()
    table = processed_events
    with engine.connect() as conn:
        rows = conn.execute(
            select(table.c.event_id).where(
                table.c.source == source, table.c.event_id.in_(list(event_ids))
            )
        ).all()
    return {row[0] for row in rows}


def order_lock_sql(n: int) -> str:
    """The advisory lock of the delivery's ``n``-th order key (sorted), for its transaction."""
    return f"SELECT pg_advisory_xact_lock({ORDER_LOCK_SPACE}, hashtext(%(lock_{n})s)); "


def results(engine: Engine, keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``{event_id: result}`` of the claims of ``keys`` ((source, event_id)) that committed."""
    table = processed_events
    with engine.connect() as conn:
        rows = conn.execute(
            select(table.c.event_id, table.c.result).where(
                tuple_(table.c.source, table.c.event_id).in_(list(keys))
            )
        ).all()
    return dict(rows)
