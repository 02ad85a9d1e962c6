"""processed_events and delivery_failures

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "processed_events",
        sa.Column("id", BigIntId, sa.Identity(), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("processed_at", Timestamp, nullable=True),
        sa.Column("payload", JSONType, nullable=True),
        sa.Column("result", JSONType, nullable=True),
        sa.Column("duplicate_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_seen_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_processed_events"),
        sa.UniqueConstraint("source", "event_id", name="uq_processed_events_source_event_id"),
        sa.CheckConstraint(
            "status IN ('processed', 'ignored')", name=op.f("ck_processed_events_status")
        ),
    )
    op.create_index(
        "ix_processed_events_source_event_type_received_at",
        "processed_events",
        ["source", "event_type", "received_at"],
    )
    op.create_index("ix_processed_events_received_at", "processed_events", ["received_at"])

    op.create_table(
        "delivery_failures",
        sa.Column("id", BigIntId, sa.Identity(), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("raw_body", sa.LargeBinary(), nullable=False),
        sa.Column("payload", JSONType, nullable=True),
        sa.Column("headers", JSONType, nullable=True),
        sa.Column("permanent", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("failed_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_failures"),
    )
    op.create_index(
        "ix_delivery_failures_source_event_id", "delivery_failures", ["source", "event_id"]
    )
    op.create_index("ix_delivery_failures_failed_at", "delivery_failures", ["failed_at"])


def downgrade() -> None:
    op.drop_table("delivery_failures")
    op.drop_table("processed_events")
