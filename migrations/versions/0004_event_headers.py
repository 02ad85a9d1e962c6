"""processed_events.headers: the delivery's headers (secrets left out), so replays see them

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: adding it rewrites nothing, however large the table.
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(
            sa.Column("headers", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"))
        )


def downgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("headers")
