"""index of the dead outbox messages, for the dashboard's and the metrics' dead listings and counts

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Nothing led with the status of ``outbox_messages`` but the worker's partial index
of pending messages (ordered by due time). "The newest dead messages" and "how
many are dead" therefore read the whole table: on a table of millions of sent
messages, where dead ones are few, every row. This partial index holds only the
dead messages, ordered like the keyset pages (``created_at``, ``id``): the dead
listing and its count become short index range reads. A message enters it only
when it goes dead, so adding and sending messages (the hot path) maintain no
extra index.

On PostgreSQL it is built ``CONCURRENTLY``: a table in use keeps taking messages
while it is built (a plain CREATE INDEX would block every insert).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_outbox_messages_dead"
WHERE = sa.text("status = 'dead'")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            # A concurrent build that was interrupted leaves an invalid index behind.
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NAME}")
            op.create_index(
                NAME,
                "outbox_messages",
                ["created_at", "id"],
                postgresql_where=WHERE,
                postgresql_concurrently=True,
            )
    else:
        op.create_index(NAME, "outbox_messages", ["created_at", "id"], sqlite_where=WHERE)


def downgrade() -> None:
    op.drop_index(NAME, table_name="outbox_messages")
