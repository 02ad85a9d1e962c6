"""outbox_messages: side effects added in a claim's transaction, delivered by idemhook worker

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_table(
        "outbox_messages",
        sa.Column("id", BigIntId, sa.Identity(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("payload", JSONType, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", Timestamp, nullable=False),
        sa.Column("leased_by", sa.String(128), nullable=True),
        sa.Column("last_attempt_at", Timestamp, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("result", JSONType, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("sent_at", Timestamp, nullable=True),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("event_id", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_messages"),
        sa.UniqueConstraint("kind", "key", name="uq_outbox_messages_kind_key"),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'dead')", name=op.f("ck_outbox_messages_status")
        ),
    )
    op.create_index(
        "ix_outbox_messages_due",
        "outbox_messages",
        ["next_attempt_at", "id"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_index(
        "ix_outbox_messages_created_at_id", "outbox_messages", ["created_at", "id"]
    )
    op.create_index(
        "ix_outbox_messages_source_event_id", "outbox_messages", ["source", "event_id"]
    )
    if op.get_bind().dialect.name == "postgresql":
        # A queue table: every message leaves dead entries in the due index as it is taken
        # and sent, and each take walks past those not vacuumed yet. Vacuum it after a
        # thousand changes rather than after a fifth of the table (the default).
        op.execute(
            "ALTER TABLE outbox_messages SET (autovacuum_vacuum_scale_factor = 0, "
            "autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.05)"
        )


def downgrade() -> None:
    op.drop_table("outbox_messages")
