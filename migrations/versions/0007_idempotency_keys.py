"""idempotency-key sources: client, fingerprint, stored response, key expiry, in-flight lease

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

- ``client``, ``fingerprint``, ``response_status``, ``response_headers``, ``expires_at``,
  ``locked_until``, ``lock_owner``: nullable without defaults, so adding them rewrites
  nothing however large the table; webhook rows leave them null.
- ``status`` may be ``in_flight`` (a key leased by the request that runs it).
- ``event_id`` grows to 320 characters in both tables: a named client's key is stored as
  ``<client>:<key>`` (64 + 1 + 255), so that ``(source, event_id)`` stays the unique
  identity. On PostgreSQL a longer ``varchar`` limit rewrites neither table nor index.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "ck_processed_events_status"
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)
BEFORE = ("processed", "ignored", "rejected")
AFTER = (*BEFORE, "in_flight")
COLUMNS = (
    ("client", sa.String(64)),
    ("fingerprint", sa.String(71)),
    ("response_status", sa.SmallInteger()),
    ("response_headers", JSONType),
    ("expires_at", Timestamp),
    ("locked_until", Timestamp),
    ("lock_owner", sa.String(32)),
)


def _event_id_length(length: int) -> None:
    # SQLite does not enforce varchar lengths: only PostgreSQL's columns change.
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in ("processed_events", "delivery_failures"):
        op.alter_column(table, "event_id", type_=sa.String(length), existing_nullable=False)


def upgrade() -> None:
    # batch_alter_table rebuilds the table on SQLite, which cannot ALTER a CHECK in place.
    with op.batch_alter_table("processed_events") as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        batch.drop_constraint(op.f(CONSTRAINT), type_="check")
        batch.create_check_constraint(op.f(CONSTRAINT), f"status IN {AFTER!r}")
    _event_id_length(320)


def downgrade() -> None:
    # Fails while keys of named clients longer than 255 characters, or in-flight keys, exist.
    _event_id_length(255)
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_constraint(op.f(CONSTRAINT), type_="check")
        batch.create_check_constraint(op.f(CONSTRAINT), f"status IN {BEFORE!r}")
        for name, _type in reversed(COLUMNS):
            batch.drop_column(name)
