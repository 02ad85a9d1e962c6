"""Handlers that say which thread ran them, registered with and without ``database_only``.

For source ``acme``: ``where.database_only`` has one handler registered
``database_only=True``; ``where.watched`` one registered without it; ``where.mixed`` one
of each. ``where.locked`` (``database_only=True``) first waits for a shared hold on
advisory lock :data:`LOCK_KEY`, so a test holding it exclusively keeps the handler in SQL.
"""

from __future__ import annotations

import threading

from sqlalchemy import text

from idemhook import handler

LOCK_KEY = 7_000_021


def _thread() -> dict[str, str]:
    return {"thread": threading.current_thread().name}


@handler("acme", "where.database_only", database_only=True)
def database_only(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    return _thread()


@handler("acme", "where.watched")
def watched(event, db):
    return _thread()


@handler("acme", "where.mixed", database_only=True)
def mixed_database_only(event, db):
    return _thread()


@handler("acme", "where.mixed")
def mixed_watched(event, db):
    return _thread()


@handler("acme", "where.locked", database_only=True)
def locked(event, db):
    db.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": LOCK_KEY})
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    return _thread()
