"""A handler that says where it ran: for tests that must tell gunicorn workers apart.

For source ``whoami``, every event is answered with its result
``{"worker": <the worker's pid>, "backend": <the PostgreSQL backend pid of the claim's
connection>, "thread": <the thread's name>}``. ``{"wait": true}`` in the payload
makes it first wait for a shared hold on advisory lock :data:`LOCK_KEY`: while the
test holds that lock exclusively, every such claim stays open on its own connection.
"""

from __future__ import annotations

import os
import threading

from sqlalchemy import text

from idemhook import handler

LOCK_KEY = 7_000_011


@handler("whoami", "*")
def whoami(event, db):
    if event.payload.get("wait"):
        db.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": LOCK_KEY})
    backend = db.execute(text("SELECT pg_backend_pid()")).scalar_one()
    return {"worker": os.getpid(), "backend": backend, "thread": threading.current_thread().name}
