"""The shop's paid orders, recorded once each in ``paid_orders``."""

from pathlib import Path

from sqlalchemy import text

from idemhook import Event, Ignore, handler

#: The paid_orders table comes from this package's own Alembic revisions.
IDEMHOOK_MIGRATIONS = Path(__file__).with_name("migrations")


@handler("shop", "order.paid")
def record_payment(event: Event, db):
    order = event.payload["order"]
    if order["total_cents"] == 0:
        return Ignore("free order: nothing to record")
    db.execute(
        text("INSERT INTO paid_orders (order_id, total_cents) VALUES (:id, :total)"),
        {"id": order["id"], "total": order["total_cents"]},
    )
    return {"order": order["id"]}
