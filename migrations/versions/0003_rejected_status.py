"""processed_events.status may be 'rejected' (a handler's Reject outcome)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "ck_processed_events_status"


def _replace_check(statuses: tuple[str, ...]) -> None:
    # batch_alter_table rebuilds the table on SQLite, which cannot ALTER a CHECK in place.
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_constraint(op.f(CONSTRAINT), type_="check")
        batch.create_check_constraint(op.f(CONSTRAINT), f"status IN {statuses!r}")


def upgrade() -> None:
    _replace_check(("processed", "ignored", "rejected"))


def downgrade() -> None:
    # Fails (the CHECK is violated) while rejected events exist: delete or keep them first.
    _replace_check(("processed", "ignored"))
