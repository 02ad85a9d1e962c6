"""outbox_messages.event_id grows to 320 characters, as the claims' did in 0007

A message added by a handler of an ``idempotency-key`` source records the event it came
from, ``<client>:<key>`` for a named client: up to 64 + 1 + 255 characters. 0007 widened
``processed_events`` and ``delivery_failures`` but not this column, so such an operation
with a key of 251 to 255 characters answered 500 on every retry ("value too long").

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _event_id_length(length: int) -> None:
    # SQLite does not enforce varchar lengths: only PostgreSQL's column changes. Widening
    # a varchar rewrites nothing in PostgreSQL.
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("outbox_messages", "event_id", type_=sa.String(length), existing_nullable=True)


def upgrade() -> None:
    _event_id_length(320)


def downgrade() -> None:
    # Fails while messages of named clients' keys longer than 255 characters exist.
    _event_id_length(255)
