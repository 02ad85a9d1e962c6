"""contacts table of the example CRM plugin

Revision ID: crm_0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "crm_0001"
# A plugin's revisions form their own branch: independent of idemhook's own.
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("crm",)
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("contact_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("portal_id", sa.BigInteger(), nullable=False),
        sa.Column("properties", JSONType, nullable=False),
        # propertyName -> occurredAt (ms) of the change that set it: the ordering guard.
        sa.Column("property_changed_at", JSONType, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("contacts")
