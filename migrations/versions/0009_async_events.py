"""Asynchronous sources: statuses received and failed, attempts, order keys, event_queue

An event of a source with ``mode = "async"`` is claimed with status ``received`` and
applied later by ``idemhook worker`` (docs/async.md). ``processed_events`` gains
``attempts`` (the worker's failed attempts) and ``order_key``; ``failed`` means every
allowed attempt failed. ``event_queue`` holds one row per event still to apply: the
row a worker locks while the event's handlers run, when it is due, and its order key.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
CONSTRAINT = "ck_processed_events_status"
OLD = ("processed", "ignored", "rejected", "in_flight")
NEW = (*OLD, "received", "failed")
KEYED = sa.text("order_key IS NOT NULL")


def _replace_check(statuses: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        # SQLite cannot ALTER a CHECK in place: batch mode rebuilds the table (the demo's).
        with op.batch_alter_table("processed_events") as batch:
            batch.drop_constraint(op.f(CONSTRAINT), type_="check")
            batch.create_check_constraint(op.f(CONSTRAINT), f"status IN {statuses!r}")
        return
    # NOT VALID, then VALIDATE after the commit: the table is locked only for the catalog
    # change; the scan that checks existing rows runs under a lock deliveries go on beside.
    op.execute(f"ALTER TABLE processed_events DROP CONSTRAINT {CONSTRAINT}")
    op.execute(
        f"ALTER TABLE processed_events ADD CONSTRAINT {CONSTRAINT} "
        f"CHECK (status IN {statuses!r}) NOT VALID"
    )
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE processed_events VALIDATE CONSTRAINT {CONSTRAINT}")


def upgrade() -> None:
    # A constant default and a nullable column: PostgreSQL rewrites nothing, however large
    # the table.
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("order_key", sa.String(255)))
    op.create_table(
        "event_queue",
        sa.Column("id", BigIntId, autoincrement=False, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("order_key", sa.String(255), nullable=True),
        sa.Column("next_attempt_at", Timestamp, nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_event_queue"),
    )
    op.create_index("ix_event_queue_due", "event_queue", ["next_attempt_at", "id"])
    op.create_index(
        "ix_event_queue_order",
        "event_queue",
        ["source", "order_key", "id"],
        postgresql_where=KEYED,
        sqlite_where=KEYED,
    )
    if op.get_bind().dialect.name == "postgresql":
        # A queue table: every event applied leaves dead entries behind, which each take
        # walks past until vacuumed. Vacuum it after a thousand changes, not a fifth of it.
        op.execute(
            "ALTER TABLE event_queue SET (autovacuum_vacuum_scale_factor = 0, "
            "autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.05)"
        )
    _replace_check(NEW)


def downgrade() -> None:
    # Fails (the CHECK is violated) while received or failed events exist: let the worker
    # finish them, and delete or keep the failed ones first.
    _replace_check(OLD)
    op.drop_table("event_queue")
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("order_key")
        batch.drop_column("attempts")
