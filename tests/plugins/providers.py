"""Test handlers for the provider sources in tests/schemes: one test_effects row per event.

Like :mod:`tests.plugins.recorder` (same tables, same failure switch), for the
sources that tests/schemes/conftest.py configures.
"""

from __future__ import annotations

from sqlalchemy import text

from idemhook import handler

SOURCES = (
    "stripe",
    "standard",
    "svix",
    "github",
    "shopify",
    "hubspot",
    "close",
    "attio",
    "pipedrive",
    "salesforce",
    "firstparty",
    "hashed",
)


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


for _source in SOURCES:
    record = handler(_source, "*")(record)
