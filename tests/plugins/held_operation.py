"""An operation (``idempotency-key`` source ``held``) that waits, mid-flight, on the test.

It writes its effect (a test_effects row), then waits for PostgreSQL advisory lock
:data:`LOCK_KEY`, which the test holds: the request stays in flight, its key leased,
until the test lets go (a card processor's API that takes its time). Its database
session keeps the web app's name (``idemhook-web``), so the test finds it waiting
(``wait_event = 'advisory'``) in pg_stat_activity. Then it answers 201.
"""

from __future__ import annotations

from sqlalchemy import text

from idemhook import Response, handler

LOCK_KEY = 7_000_021


@handler("held", "*")
def operate(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    return Response(201, {"charged": event.id})
