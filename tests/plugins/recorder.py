"""Test handlers with a visible effect: one row in test_effects per application.

test_effects has no unique constraint on purpose: a second application of the
same event would show up as a second row. A row in test_failures makes the
handler raise after writing its effect (to prove the effect is rolled back);
deleting the row is "the fix". ``{"sleep": seconds}`` in the payload holds the
claim's transaction open to widen races.
"""

from __future__ import annotations

import time

from sqlalchemy import text

from idemhook import handler

TABLES = (
    "CREATE TABLE IF NOT EXISTS test_effects "
    "(source VARCHAR(64) NOT NULL, event_id VARCHAR(320) NOT NULL)",
    "CREATE TABLE IF NOT EXISTS test_failures "
    "(event_id VARCHAR(255) PRIMARY KEY, reason VARCHAR(255) NOT NULL)",
)


@handler("acme", "contact.*")
@handler("batched", "*")
@handler("open", "*")
def record(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    if isinstance(event.payload.get("sleep"), int | float):
        time.sleep(event.payload["sleep"])
    reason = db.execute(
        text("SELECT reason FROM test_failures WHERE event_id = :event_id"),
        {"event_id": event.id},
    ).scalar()
    if reason:
        raise RuntimeError(reason)
    return {"applied": event.id}
