"""Tenants: source_secrets, secret_matches, and the tenant of each event

A source with ``tenants = true`` is also served at ``POST /webhooks/<source>/<tenant>``:
each tenant's secrets live in ``source_secrets``, encrypted (``secret`` holds a Fernet
token, never the secret), and a delivery is verified against that tenant's live ones.
``processed_events.tenant`` and ``delivery_failures.tenant`` say which tenant sent an
event (null for a source's own endpoint; the ``event_id`` of a tenant's event is
``<tenant>:<id>``, so ``(source, event_id)`` stays the one unique key).
``secret_matches`` counts, per static secret of a source (its position in the list;
``<client>:<position>`` for a named client of an idempotency-key source),
the deliveries it verified and when it last did; tenants' secrets keep theirs in their own
row.

No index on ``processed_events.tenant``: every claim inserts a row, and an index would be
maintained by each of them for queries that can filter on ``event_id``'s prefix instead.
Adding nullable columns without a default rewrites no table.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("processed_events", sa.Column("tenant", sa.String(64), nullable=True))
    op.add_column("delivery_failures", sa.Column("tenant", sa.String(64), nullable=True))
    op.create_table(
        "source_secrets",
        sa.Column("id", BigIntId, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("expires_at", Timestamp, nullable=True),
        sa.Column("last_matched_at", Timestamp, nullable=True),
        sa.Column("matched_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_source_secrets"),
    )
    op.create_index("ix_source_secrets_source_tenant", "source_secrets", ["source", "tenant"])
    op.create_table(
        "secret_matches",
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("secret", sa.String(80), nullable=False),
        sa.Column("last_matched_at", Timestamp, nullable=False),
        sa.Column("matched_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("source", "secret", name="pk_secret_matches"),
    )


def downgrade() -> None:
    op.drop_table("secret_matches")
    op.drop_index("ix_source_secrets_source_tenant", table_name="source_secrets")
    op.drop_table("source_secrets")
    op.drop_column("delivery_failures", "tenant")
    op.drop_column("processed_events", "tenant")
