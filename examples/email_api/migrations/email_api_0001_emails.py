"""emails table of the example email-send API

Revision ID: email_api_0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "email_api_0001"
# A plugin's revisions form their own branch; the outbox table comes from idemhook's.
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("email_api",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "emails",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(),
            primary_key=True,
        ),
        # The request's Idempotency-Key (the event ID): one email per key.
        sa.Column("idempotency_key", sa.String(255), nullable=False, unique=True),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        # The outbox message that sends it (outbox_messages.id).
        sa.Column("outbox_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("emails")
