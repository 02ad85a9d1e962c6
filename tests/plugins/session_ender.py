"""A handler (source ``doomed``, asynchronous) that can end its own database session.

Each run is traced first, outside its transaction (:func:`tests.plugins.traced.trace`,
call ``run``), so runs whose transaction was lost still count. With ``{"end_session":
true}`` in the payload it then ends its own backend
(``pg_terminate_backend(pg_backend_pid())``), as a failover, a pooler or an
administrator would while the handler runs; otherwise it writes one ``test_applied``
row and returns.
"""

from __future__ import annotations

import os

from sqlalchemy import text

from idemhook import handler
from tests.plugins.traced import trace


@handler("doomed", "*")
def apply_doomed(event, db):
    trace("run", source=event.source, event_id=event.id)
    if event.payload.get("end_session"):
        db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    db.execute(
        text(
            "INSERT INTO test_applied (source, event_id, key, pid) "
            "VALUES (:source, :event_id, NULL, :pid)"
        ),
        {"source": event.source, "event_id": event.id, "pid": os.getpid()},
    )
    return {"applied": event.id}
