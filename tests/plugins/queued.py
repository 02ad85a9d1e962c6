"""Handlers for asynchronous sources, applied by ``idemhook worker`` (docs/async.md).

Every application writes one ``test_applied`` row in the handler's transaction: its
``n`` (a sequence, so the order of applications per order key can be read back),
the event, its ``key`` payload field and the worker's pid. No unique constraint:
an event applied twice would show as two rows. What the payload asks for, after
the row is written:

- ``{"sleep": s}``: label the session ``test-handler-<pid>`` (so a test sees the handler
  running, by the worker's own pid) and sleep ``s`` seconds in Python (a slow API);
- ``{"fail": n}``: raise while fewer than ``n`` failures of the event are recorded
  in ``delivery_failures`` (so: fail ``n`` times, then succeed); ``"always"``: raise;
- ``{"reject": reason}``: return ``Reject(reason)``;
- ``{"ignore": reason}``: return ``Ignore(reason)``;
- ``{"block": true}``: label the session ``test-handler-<pid>`` (visible in
  ``pg_stat_activity``) and wait for advisory lock :data:`LOCK_KEY`, which the test
  holds: the handler is stuck in its transaction until the test lets go;
- ``{"mail": true}``: add an ``email`` outbox message (sent by the worker too);
- ``{"die": true}``: SIGKILL the process running the handler, as the OOM killer
  would (only ever sent to real worker processes).
"""

from __future__ import annotations

import os
import signal
import time

from sqlalchemy import text

from idemhook import Ignore, Reject, handler

LOCK_KEY = 7_000_014
APPLICATION_NAME_PREFIX = "test-handler-"
#: The async test sources use these names; handlers match all of their types.
SOURCES = ("queued", "queued_batch", "ordered")


def tables(dialect: str) -> tuple[str, ...]:
    """The DDL of this plugin's table on ``dialect`` (run by the tests' schema set-up)."""
    n = "BIGSERIAL PRIMARY KEY" if dialect == "postgresql" else "INTEGER PRIMARY KEY"
    return (
        f"CREATE TABLE IF NOT EXISTS test_applied (n {n}, source VARCHAR(64) NOT NULL, "
        "event_id VARCHAR(255) NOT NULL, key VARCHAR(255), pid INTEGER NOT NULL)",
    )


@handler("queued", "*")
@handler("queued_batch", "*")
@handler("ordered", "*")
def apply(event, db):
    payload = event.payload
    db.execute(
        text(
            "INSERT INTO test_applied (source, event_id, key, pid) "
            "VALUES (:source, :event_id, :key, :pid)"
        ),
        {
            "source": event.source,
            "event_id": event.id,
            "key": None if payload.get("key") is None else str(payload["key"]),
            "pid": os.getpid(),
        },
    )
    if payload.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    if payload.get("block"):
        db.execute(
            text("SELECT set_config('application_name', :name, true)"),
            {"name": f"{APPLICATION_NAME_PREFIX}{os.getpid()}"},
        )
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    if isinstance(payload.get("sleep"), int | float):
        db.execute(
            text("SELECT set_config('application_name', :name, true)"),
            {"name": f"{APPLICATION_NAME_PREFIX}{os.getpid()}"},
        )
        time.sleep(payload["sleep"])
    fail = payload.get("fail")
    if fail == "always":
        raise RuntimeError("the CRM is down")
    if isinstance(fail, int):
        failed = db.execute(
            text(
                "SELECT count(*) FROM delivery_failures "
                "WHERE source = :source AND event_id = :event_id"
            ),
            {"source": event.source, "event_id": event.id},
        ).scalar()
        if failed < fail:
            raise RuntimeError(f"failure {failed + 1} of {fail}")
    if payload.get("reject"):
        return Reject(payload["reject"])
    if payload.get("ignore"):
        return Ignore(payload["ignore"])
    if payload.get("mail"):
        event.outbox.add("email", {"to": "ada@example.com", "subject": event.id, "text": "hi"})
    return {"applied": event.id}
