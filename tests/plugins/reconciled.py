"""Handlers of the reconcile tests' sources, and a plugin reconciler (docs/reconcile.md).

Every application writes one ``test_effects`` row (no unique constraint: an event applied
twice shows as two rows); a ``test_failures`` row for the event makes the handler raise
after writing it (the effect is rolled back with the claim). ``crm`` has no event log
of its own: its ``@reconciler`` yields the contacts changed in the window from the
``test_crm_contacts`` table, each with the ID the live source reads from a delivery.
"""

from __future__ import annotations

import os

from sqlalchemy import create_engine, text

from idemhook import Window, handler, reconciler

#: The environment variable naming the database the ``crm`` reconciler reads its
#: "provider API" from (set by the test).
CRM_DATABASE_VARIABLE = "TEST_CRM_DATABASE_URL"
TABLES = (
    "CREATE TABLE IF NOT EXISTS test_crm_contacts (id VARCHAR(64) PRIMARY KEY, "
    "version INTEGER NOT NULL, changed_at TIMESTAMP WITH TIME ZONE NOT NULL)",
)


@handler("stripe", "*")
@handler("github", "*")
@handler("crm", "*")
def record(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    reason = db.execute(
        text("SELECT reason FROM test_failures WHERE event_id = :event_id"),
        {"event_id": event.id},
    ).scalar()
    if reason:
        raise RuntimeError(reason)
    return {"applied": event.id}


@reconciler("crm")
def changed_contacts(window: Window):
    """The CRM's "search contacts modified since": one event per contact version."""
    engine = create_engine(os.environ[CRM_DATABASE_VARIABLE])
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, version FROM test_crm_contacts "
                    "WHERE changed_at >= :since AND changed_at <= :until ORDER BY id"
                ),
                {"since": window.since, "until": window.until},
            ).all()
    finally:
        engine.dispose()
    for contact_id, version in rows:
        # The live webhook's ID is "<contact>:<version>" (event_id = "body:event_id").
        yield {"event_id": f"{contact_id}:{version}", "type": "contact.updated",
               "contact": contact_id}
