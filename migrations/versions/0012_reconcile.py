"""Reconcile: processed_events.received_via, and reconcile_runs

``idemhook reconcile`` (docs/reconcile.md) finds events a provider never got through in
the provider's own event log and applies them through the claim. ``received_via`` says
how an event arrived: ``delivery`` (every event so far) or ``reconcile``.
``reconcile_runs`` holds one row per run: its window, counts and error, and its fence
(one unfinished run per source; one run per scheduled slot).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
RUNNING = sa.text("finished_at IS NULL")
OUTCOMES = ("running", "succeeded", "refused", "failed", "interrupted", "abandoned")


def upgrade() -> None:
    # A constant default: PostgreSQL rewrites nothing, however large the table.
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(
            sa.Column(
                "received_via", sa.String(16), server_default="delivery", nullable=False
            )
        )
    op.create_table(
        "reconcile_runs",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("started_by", sa.String(16), nullable=False),
        sa.Column("scheduled_for", Timestamp, nullable=True),
        sa.Column("window_start", Timestamp, nullable=False),
        sa.Column("window_end", Timestamp, nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("lease_until", Timestamp, nullable=True),
        sa.Column("seen", sa.Integer(), server_default="0", nullable=False),
        sa.Column("already", sa.Integer(), server_default="0", nullable=False),
        sa.Column("recovered", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reconcile_runs"),
        sa.UniqueConstraint(
            "source", "scheduled_for", name="uq_reconcile_runs_source_scheduled_for"
        ),
        sa.CheckConstraint(f"outcome IN {OUTCOMES!r}", name="ck_reconcile_runs_outcome"),
    )
    op.create_index(
        "uq_reconcile_runs_running",
        "reconcile_runs",
        ["source"],
        unique=True,
        postgresql_where=RUNNING,
        sqlite_where=RUNNING,
    )
    op.create_index(
        "ix_reconcile_runs_source_started_at_id",
        "reconcile_runs",
        ["source", "started_at", "id"],
    )


def downgrade() -> None:
    op.drop_table("reconcile_runs")
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("received_via")
