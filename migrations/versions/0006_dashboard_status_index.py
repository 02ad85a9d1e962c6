"""index of the events that are not 'processed', for the dashboard's status filters and counts

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

The dashboard filters and counts events by status (ignored, rejected, and the
queued statuses to come). No index led with status, so "the newest rejected
events" read the table back from its newest row until it found enough: every
row on a table of millions where rejections are rare. This partial index holds
only the rows whose status is not ``processed``, ordered like the keyset pages
(``received_at``, ``id``): those listings and counts become short index range
reads. Processed events, nearly all of them, are not in it, so the claim's
insert of a processed event maintains no extra index; a listing filtered on
``processed`` still uses the existing indexes. It carries ``source`` (``INCLUDE``,
PostgreSQL), so counting one status per source is an index-only read.

On PostgreSQL it is built ``CONCURRENTLY``: a table in use keeps taking
deliveries while it is built (a plain CREATE INDEX would block every insert).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_processed_events_not_processed"
WHERE = sa.text("status <> 'processed'")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            # A concurrent build that was interrupted leaves an invalid index behind.
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NAME}")
            op.create_index(
                NAME,
                "processed_events",
                ["status", "received_at", "id"],
                postgresql_where=WHERE,
                postgresql_include=["source"],
                postgresql_concurrently=True,
            )
    else:
        op.create_index(
            NAME, "processed_events", ["status", "received_at", "id"], sqlite_where=WHERE
        )


def downgrade() -> None:
    op.drop_index(NAME, table_name="processed_events")
