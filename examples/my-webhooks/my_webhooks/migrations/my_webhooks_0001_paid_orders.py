"""paid_orders

Revision ID: my_webhooks_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "my_webhooks_0001"
down_revision = None
branch_labels = ("my_webhooks",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "paid_orders",
        sa.Column("order_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("total_cents", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("paid_orders")
