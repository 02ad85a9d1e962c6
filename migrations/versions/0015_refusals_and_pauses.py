"""Refused deliveries and paused sources: rejected_deliveries, source_pauses

``rejected_deliveries`` holds a row per delivery refused before its claim (signature,
timestamp, size, type, parsing, unknown tenant), at most IDEMHOOK_REJECTIONS_PER_MINUTE
per source and minute plus one that counts the rest: the unique key
``(source, minute, slot)`` is what caps them. ``source_pauses`` holds one row per paused
source (``idemhook sources pause``).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rejected_deliveries",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(255), nullable=True),
        sa.Column("error", sa.String(64), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("minute", Timestamp, nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), server_default="1", nullable=False),
        sa.Column("client_addr", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column("body_bytes", sa.BigInteger(), nullable=True),
        sa.Column("body_sha256", sa.String(64), nullable=True),
        sa.Column("headers", JSONType, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rejected_deliveries"),
        sa.UniqueConstraint(
            "source", "minute", "slot", name="uq_rejected_deliveries_source_minute_slot"
        ),
    )
    op.create_index(
        "ix_rejected_deliveries_received_at", "rejected_deliveries", ["received_at"]
    )
    op.create_table(
        "source_pauses",
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("paused_at", Timestamp, nullable=False),
        sa.Column("paused_by", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("source", name="pk_source_pauses"),
    )


def downgrade() -> None:
    op.drop_table("source_pauses")
    op.drop_index("ix_rejected_deliveries_received_at", table_name="rejected_deliveries")
    op.drop_table("rejected_deliveries")
