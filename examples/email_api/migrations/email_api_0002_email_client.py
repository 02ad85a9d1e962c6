"""emails.client: the API client that queued the email (who may read it)

Revision ID: email_api_0002
Revises: email_api_0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "email_api_0002"
down_revision: str | Sequence[str] | None = "email_api_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The client's name under [sources.emails.clients]; null for the anonymous client
    # of `secret`. GET /v1/emails/<id> shows an email only to the client that sent it.
    with op.batch_alter_table("emails") as batch:
        batch.add_column(sa.Column("client", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("emails") as batch:
        batch.drop_column("client")
