"""A handler with an effect outside the database, as real handlers have (an e-mail, a CRM call).

For source ``outside``: it writes its database effect (a test_effects row), then
appends one line, the request's ``X-Attempt`` header, to the file the payload
names (the outside effect, which no rollback can undo), then:

- ``{"sleep": s}``: sleeps ``s`` seconds in Python, after its last SQL, but only
  when the file held no line before (the first attempt; a retry does not sleep);
- ``{"kill": true}``: ends its own database session (a lost connection while a
  handler runs), again on the first attempt only.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text

from idemhook import handler


@handler("outside", "*")
def call_out(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    path = Path(event.payload["file"])
    first = not path.exists() or not path.read_text()
    with path.open("a") as out:
        out.write(f"{event.headers.get('X-Attempt', '-')}\n")
    if first and event.payload.get("kill"):
        db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    if first and isinstance(event.payload.get("sleep"), int | float):
        time.sleep(event.payload["sleep"])
    return {"called": event.id}
