"""A handler that breaks the contract by committing the claim's transaction itself."""

from __future__ import annotations

from sqlalchemy import text

from idemhook import handler


@handler("acme", "misbehave.commit")
def commits(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    db.commit()
