"""A handler that blocks inside the claim's transaction, for fault tests.

It writes its effect (a test_effects row) first, then labels its database
session ``test-handler-<pid>`` (visible in pg_stat_activity, so a test can
find which gunicorn worker holds the event) and blocks as the payload asks:

- ``{"block": "lock"}``: waits for PostgreSQL advisory lock :data:`LOCK_KEY`,
  which the test holds, so the handler stays stuck until the test lets go;
- ``{"block": "sleep", "seconds": s}``: ``pg_sleep(s)`` (a long statement).
"""

from __future__ import annotations

import os

from sqlalchemy import text

from idemhook import handler

LOCK_KEY = 7_000_007
APPLICATION_NAME_PREFIX = "test-handler-"


@handler("blocking", "*")
def block(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    db.execute(
        text("SELECT set_config('application_name', :name, true)"),  # this transaction only
        {"name": f"{APPLICATION_NAME_PREFIX}{os.getpid()}"},
    )
    mode = event.payload.get("block")
    if mode == "lock":
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    elif mode == "sleep":
        db.execute(text("SELECT pg_sleep(:s)"), {"s": float(event.payload["seconds"])})
    return {"applied": event.id}
