"""Asynchronous sources: processed_events.interruptions, takes that ended with the worker

``idemhook worker`` counts each take of an event in a transaction of its own before its
handlers run, and takes the count back when it records the attempt. A worker that dies
while it holds the event (SIGKILL, the OOM killer, a crash in native code) leaves the
count behind: ``interruptions`` is how many times that happened. An event that
interrupted ``MAX_INTERRUPTIONS`` workers is taken alone and then ended ``failed``
instead of killing the next worker too (docs/async.md).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL rewrites nothing, however large the table.
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(
            sa.Column("interruptions", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("interruptions")
