"""A handler that reports the event exactly as it saw it, for the one-handler-path tests.

For source ``witness``: its result is the event's id, type, payload, received_at
and one header (``X-Witness``), so tests can compare what the live delivery,
``events replay``, ``failures retry`` and the test kit each handed to it. The
payload steers it: ``{"outcome": "reject" | "raise"}``; a row in test_failures
for the event makes it raise (delete the row to "fix" it, as in recorder).
``{"defer": true}`` writes a row that breaks a deferred constraint, so the
transaction fails only at COMMIT.
"""

from __future__ import annotations

from sqlalchemy import text

from idemhook import Reject, handler

TABLES = (
    "CREATE TABLE IF NOT EXISTS test_deferred (id INTEGER NOT NULL, "
    "CONSTRAINT uq_test_deferred UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)",
)


@handler("witness", "*")
def witness(event, db):
    seen = {
        "id": event.id,
        "type": event.type,
        "payload": event.payload,
        "header": event.headers.get("X-Witness"),
        "received_at": event.received_at.isoformat(),
    }
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    if event.payload.get("defer"):
        db.execute(text("INSERT INTO test_deferred (id) VALUES (1), (1)"))
    reason = db.execute(
        text("SELECT reason FROM test_failures WHERE event_id = :event_id"),
        {"event_id": event.id},
    ).scalar()
    if reason:
        raise RuntimeError(reason)
    if event.payload.get("outcome") == "reject":
        return Reject("witness refuses")
    return seen
