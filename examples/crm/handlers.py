"""HubSpot ``contact.creation`` / ``contact.propertyChange`` / ``contact.deletion`` -> ``contacts``.

HubSpot delivers out of order and retries: the receiver makes each event apply
once; these handlers make the order harmless. Each property remembers the
``occurredAt`` of the change that set it, and an older change arriving late is
acknowledged with ``Ignore`` instead of overwriting newer data. A deleted
contact keeps a tombstone row (no properties) so late events cannot revive it.
An event without the fields every contact event has is ``Reject``-ed: no retry
will ever make it valid.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    MetaData,
    Row,
    Table,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from idemhook import Event, Ignore, Reject, handler

#: The contacts table comes from this plugin's own Alembic revisions.
IDEMHOOK_MIGRATIONS = Path(__file__).with_name("migrations")

contacts = Table(
    "contacts",
    MetaData(),
    Column("contact_id", BigInteger, primary_key=True),
    Column("portal_id", BigInteger, nullable=False),
    Column("properties", JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
    Column(
        "property_changed_at",
        JSON().with_variant(postgresql.JSONB(), "postgresql"),
        nullable=False,
    ),
    Column("created_at", DateTime(timezone=True)),
    Column("deleted_at", DateTime(timezone=True)),
)


def _fields(event: Event) -> tuple[int, int, int]:
    """``(contact_id, portal_id, occurred_at_ms)``; Reject when they are missing or malformed."""
    payload = event.payload
    values = [payload.get(key) for key in ("objectId", "portalId", "occurredAt")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise Reject("objectId, portalId and occurredAt must be whole numbers")
    contact_id, portal_id, occurred_at = values
    return contact_id, portal_id, occurred_at


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _locked_contact(db: Session, contact_id: int, portal_id: int) -> Row[Any]:
    """The contact's row, created empty if new, locked until the claim commits."""
    dialect_insert = (
        postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    )
    db.execute(
        dialect_insert(contacts)
        .values(contact_id=contact_id, portal_id=portal_id, properties={}, property_changed_at={})
        .on_conflict_do_nothing(index_elements=["contact_id"])
    )
    # FOR UPDATE: two events for one contact at once apply one after the other.
    query = select(contacts).where(contacts.c.contact_id == contact_id).with_for_update()
    return db.execute(query).one()


def _deleted(row: Row[Any]) -> Ignore | None:
    if row.deleted_at is not None:
        return Ignore(f"contact {row.contact_id} is deleted")
    return None


@handler("hubspot", "contact.creation")
def contact_created(event: Event, db: Session) -> Any:
    """Record when the contact was created (its properties arrive as property changes)."""
    contact_id, portal_id, occurred_at = _fields(event)
    row = _locked_contact(db, contact_id, portal_id)
    if skipped := _deleted(row):
        return skipped
    db.execute(
        update(contacts)
        .where(contacts.c.contact_id == contact_id)
        .values(created_at=_time(occurred_at))
    )
    return {"contact": contact_id, "created": True}


@handler("hubspot", "contact.propertyChange")
def property_changed(event: Event, db: Session) -> Any:
    """Set one property, unless a newer change of it was already applied."""
    contact_id, portal_id, occurred_at = _fields(event)
    name = event.payload.get("propertyName")
    if not isinstance(name, str) or not name:
        raise Reject("a contact.propertyChange without propertyName")
    row = _locked_contact(db, contact_id, portal_id)
    if skipped := _deleted(row):
        return skipped
    applied = row.property_changed_at.get(name)
    if applied is not None and occurred_at < applied:
        # Providers deliver out of order: acknowledge the stale change, keep the newer value.
        return Ignore(f"out of order: {name} was already set by a change at {applied}")
    db.execute(
        update(contacts)
        .where(contacts.c.contact_id == contact_id)
        .values(
            properties={**row.properties, name: event.payload.get("propertyValue")},
            property_changed_at={**row.property_changed_at, name: occurred_at},
        )
    )
    return {"contact": contact_id, "property": name}


@handler("hubspot", "contact.deletion")
def contact_deleted(event: Event, db: Session) -> Any:
    """Forget the contact's data; keep a tombstone so late events cannot bring it back."""
    contact_id, portal_id, occurred_at = _fields(event)
    row = _locked_contact(db, contact_id, portal_id)
    if skipped := _deleted(row):
        return skipped
    db.execute(
        update(contacts)
        .where(contacts.c.contact_id == contact_id)
        .values(properties={}, deleted_at=_time(occurred_at))
    )
    return {"contact": contact_id, "deleted": True}
