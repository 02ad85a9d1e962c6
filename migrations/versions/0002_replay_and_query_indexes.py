"""replay columns and the indexes behind the read API and the documented SQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(sa.Column("replayed_at", Timestamp, nullable=True))
        batch.add_column(
            sa.Column("replay_count", sa.Integer(), server_default="0", nullable=False)
        )
    # Keyset pagination orders by (received_at, id): the same index serves "newest
    # first", "since T" and pruning, so it replaces the single-column one.
    op.drop_index("ix_processed_events_received_at", table_name="processed_events")
    op.create_index(
        "ix_processed_events_received_at_id", "processed_events", ["received_at", "id"]
    )
    op.create_index(
        "ix_delivery_failures_failed_at_id", "delivery_failures", ["failed_at", "id"]
    )
    op.drop_index("ix_delivery_failures_failed_at", table_name="delivery_failures")


def downgrade() -> None:
    op.create_index("ix_delivery_failures_failed_at", "delivery_failures", ["failed_at"])
    op.drop_index("ix_delivery_failures_failed_at_id", table_name="delivery_failures")
    op.create_index("ix_processed_events_received_at", "processed_events", ["received_at"])
    op.drop_index("ix_processed_events_received_at_id", table_name="processed_events")
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("replay_count")
        batch.drop_column("replayed_at")
