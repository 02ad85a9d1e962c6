"""processed_events for asynchronous sources: statuses received and failed, attempts, order keys

An event of a source with ``mode = "async"`` is claimed with status ``received`` and
applied later by ``idemhook worker`` (docs/async.md): ``attempts`` counts the worker's
failed attempts, ``next_attempt_at`` is when it is due (a backoff after a failure),
``order_key`` the value of the source's ``order_key`` locator. ``failed``: every allowed
attempt failed.

Two partial indexes hold only the events still to apply (small, hot): the worker's
"what is due" scan and its "is an earlier event of this order key unfinished" probe.

Revision ID: 0008
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "ck_processed_events_status"
OLD = ("processed", "ignored", "rejected")
NEW = ("processed", "ignored", "rejected", "received", "failed")
RECEIVED = "status = 'received'"
DUE = "ix_processed_events_due"
ORDER = "ix_processed_events_order"
INDEXES = (
    # The worker's scan: what is due, oldest first.
    (DUE, ("next_attempt_at", "id"), RECEIVED),
    # The worker's probe: an earlier unfinished event of the same order key.
    (ORDER, ("source", "order_key", "id"), f"{RECEIVED} AND order_key IS NOT NULL"),
)


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
    # A constant default and nullable columns: PostgreSQL rewrites nothing, however large
    # the table.
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("order_key", sa.String(255)))
    _replace_check(NEW)
    # Partial indexes: only events still to apply are in them. Building one reads the whole
    # table; CONCURRENTLY (PostgreSQL) lets deliveries go on meanwhile, outside the
    # migration's transaction.
    for name, columns, where in INDEXES:
        if op.get_bind().dialect.name == "postgresql":
            with op.get_context().autocommit_block():
                op.execute(
                    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON processed_events "
                    f"({', '.join(columns)}) WHERE {where}"
                )
        else:
            op.create_index(name, "processed_events", list(columns), sqlite_where=sa.text(where))


def downgrade() -> None:
    # Fails (the CHECK is violated) while received or failed events exist: let the worker
    # finish them, and delete or keep the failed ones first.
    op.drop_index(ORDER, "processed_events")
    op.drop_index(DUE, "processed_events")
    _replace_check(OLD)
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("order_key")
        batch.drop_column("next_attempt_at")
        batch.drop_column("attempts")
