"""``source_secrets`` and ``secret_matches``: tenants' secrets (encrypted) and which secret matched.

The values in ``source_secrets.secret`` are Fernet tokens made by
:mod:`idemhook._config.secrets`; nothing here sees a secret in clear. Match counts arrive
in tallies, one statement per secret seen since the last flush
(:mod:`idemhook._engine.tenants`), never one per delivery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, case, delete, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite

from idemhook._store.models import secret_matches, source_secrets


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """One tenant secret as the delivery's lookup reads it: still encrypted."""

    id: int
    token: bytes
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Tally:
    """Deliveries one secret verified since the last flush, and the last one's time."""

    count: int
    last: datetime


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone; they are stored in UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def of_tenant(engine: Engine, source: str, tenant: str) -> list[StoredSecret]:
    """Every secret of ``tenant`` (live or expired), by the ``(source, tenant)`` index."""
    t = source_secrets.c
    query = select(t.id, t.secret, t.expires_at).where(t.source == source, t.tenant == tenant)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [StoredSecret(row.id, bytes(row.secret), _aware(row.expires_at)) for row in rows]


def add(
    engine: Engine,
    source: str,
    tenant: str,
    token: bytes,
    *,
    created_at: datetime,
    expires_at: datetime | None,
) -> int:
    """Store a tenant's new secret (``token``: encrypted); its id."""
    statement = (
        insert(source_secrets)
        .values(
            source=source,
            tenant=tenant,
            secret=token,
            created_at=created_at,
            expires_at=expires_at,
            matched_count=0,
        )
        .returning(source_secrets.c.id)
    )
    with engine.begin() as connection:
        return int(connection.execute(statement).scalar_one())


def listing(engine: Engine, source: str, tenant: str | None = None) -> list[dict[str, Any]]:
    """A source's tenant secrets, without their values, by tenant then id."""
    t = source_secrets.c
    query = select(
        t.id, t.tenant, t.created_at, t.expires_at, t.last_matched_at, t.matched_count
    ).where(t.source == source)
    if tenant is not None:
        query = query.where(t.tenant == tenant)
    with engine.connect() as connection:
        rows = connection.execute(query.order_by(t.tenant, t.id)).all()
    return [
        {
            "id": row.id,
            "tenant": row.tenant,
            "created_at": _aware(row.created_at),
            "expires_at": _aware(row.expires_at),
            "last_matched_at": _aware(row.last_matched_at),
            "matched_count": row.matched_count,
        }
        for row in rows
    ]


def expire(engine: Engine, source: str, tenant: str, secret_id: int, when: datetime) -> bool:
    """Set when a secret stops verifying; False if the source and tenant have no such secret."""
    t = source_secrets.c
    statement = (
        update(source_secrets)
        .where(t.id == secret_id, t.source == source, t.tenant == tenant)
        .values(expires_at=when)
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount == 1


def remove(engine: Engine, source: str, tenant: str, secret_id: int) -> bool:
    """Delete a secret; False if the source and tenant have no such secret."""
    t = source_secrets.c
    statement = delete(source_secrets).where(
        t.id == secret_id, t.source == source, t.tenant == tenant
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount == 1


def count(engine: Engine) -> int:
    """How many tenant secrets are stored (any source)."""

    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(source_secrets)).scalar())


def rewrite_all(engine: Engine, rewrite: Any) -> int:
    """Replace every row's token with ``rewrite(token)``, in one transaction; how many.

    The rows are locked while they are rewritten, so a secret added meanwhile waits, and
    is written with the new key anyway.
    """
    t = source_secrets.c
    done = 0
    with engine.begin() as connection:
        query = select(t.id, t.secret).order_by(t.id)
        if engine.dialect.name == "postgresql":
            query = query.with_for_update()
        for row in connection.execute(query).all():
            connection.execute(
                update(source_secrets)
                .where(t.id == row.id)
                .values(secret=rewrite(bytes(row.secret)))
            )
            done += 1
    return done


def record_matches(
    connection: Connection,
    static: Mapping[tuple[str, str], Tally],
    tenants: Mapping[int, Tally],
) -> None:
    """Add tallies: ``static`` by (source, position), ``tenants`` by secret id, in the
    transaction the caller holds on ``connection`` (all of them or none).

    One statement per secret seen; the last match moves only forward, whatever order
    processes flush in.
    """
    for (source, label), tally in sorted(static.items()):
        connection.execute(_upsert_static(connection, source, label, tally))
    t = source_secrets.c
    for secret_id, tally in sorted(tenants.items()):
        connection.execute(
            update(source_secrets)
            .where(t.id == secret_id)
            .values(
                matched_count=t.matched_count + tally.count,
                last_matched_at=case(
                    (t.last_matched_at.is_(None), literal(tally.last, t.last_matched_at.type)),
                    (
                        t.last_matched_at < literal(tally.last, t.last_matched_at.type),
                        literal(tally.last, t.last_matched_at.type),
                    ),
                    else_=t.last_matched_at,
                ),
            )
        )


def _upsert_static(connection: Connection, source: str, label: str, tally: Tally) -> Any:
    postgres = connection.dialect.name == "postgresql"
    dialect_insert = postgresql.insert if postgres else sqlite.insert
    t = secret_matches
    stmt = dialect_insert(t).values(
        source=source, secret=label, last_matched_at=tally.last, matched_count=tally.count
    )
    return stmt.on_conflict_do_update(
        index_elements=[t.c.source, t.c.secret],
        set_={
            "matched_count": t.c.matched_count + stmt.excluded.matched_count,
            "last_matched_at": case(
                (
                    t.c.last_matched_at < stmt.excluded.last_matched_at,
                    stmt.excluded.last_matched_at,
                ),
                else_=t.c.last_matched_at,
            ),
        },
    )


def static_matches(engine: Engine, sources: Iterable[str] | None = None) -> dict[str, dict]:
    """``{source: {position: {"last_matched_at", "matched_count"}}}`` of static secrets."""
    query = select(secret_matches)
    if sources is not None:
        query = query.where(secret_matches.c.source.in_(list(sources)))
    found: dict[str, dict] = {}
    with engine.connect() as connection:
        for row in connection.execute(query).all():
            found.setdefault(row.source, {})[row.secret] = {
                "last_matched_at": _aware(row.last_matched_at),
                "matched_count": row.matched_count,
            }
    return found


def tenant_counts(engine: Engine) -> dict[str, int]:
    """How many tenants each source has secrets for."""

    t = source_secrets.c
    query = select(t.source, func.count(t.tenant.distinct())).group_by(t.source)
    with engine.connect() as connection:
        return {source: int(n) for source, n in connection.execute(query).all()}
