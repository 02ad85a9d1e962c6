"""Handlers for sources with ``freshness``: a naive CRM that overwrites what it is sent.

``sync`` writes the event's ``data`` into ``test_objects`` whatever it held (the bug
freshness prevents: a late update overwriting newer data) and appends one
``test_object_log`` row per run: ``n`` (a sequence, drawn while the event holds its
object's lock, so the rows of one object are in the order their runs committed), the
object, the version and the event. No unique constraint: a run twice shows twice.
``audit`` (``stale=True``) appends to ``test_audit`` for every event, stale or not,
with ``event.stale``.

What the payload asks for: ``{"fail": true}`` raise after writing; ``{"reject": reason}``
return ``Reject(reason)``; ``{"audit_fail": true}``: the audit handler raises.
"""

from __future__ import annotations

from sqlalchemy import text

from idemhook import Reject, handler

#: The sources these handlers serve (the tests configure them with freshness).
SOURCES = ("versioned", "versioned_batch", "versioned_async", "audited")


def tables(dialect: str) -> tuple[str, ...]:
    """The DDL of this plugin's tables on ``dialect`` (run by the tests' schema set-up)."""
    n = "BIGSERIAL PRIMARY KEY" if dialect == "postgresql" else "INTEGER PRIMARY KEY"
    return (
        "CREATE TABLE IF NOT EXISTS test_objects (source VARCHAR(64) NOT NULL, "
        "object_key VARCHAR(255) NOT NULL, version NUMERIC NOT NULL, "
        "event_id VARCHAR(320) NOT NULL, data VARCHAR(255), PRIMARY KEY (source, object_key))",
        f"CREATE TABLE IF NOT EXISTS test_object_log (n {n}, source VARCHAR(64) NOT NULL, "
        "object_key VARCHAR(255) NOT NULL, version NUMERIC NOT NULL, "
        "event_id VARCHAR(320) NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS test_audit (n {n}, source VARCHAR(64) NOT NULL, "
        "event_id VARCHAR(320) NOT NULL, stale BOOLEAN NOT NULL)",
    )


@handler("versioned", "*")
@handler("versioned_batch", "*")
@handler("versioned_async", "*")
@handler("audited", "*")
def sync(event, db):
    payload = event.payload
    values = {
        "source": event.source,
        "object_key": str(payload["object"]),
        "version": payload["version"] if not isinstance(payload["version"], str) else 0,
        "event_id": event.id,
        "data": payload.get("data"),
    }
    db.execute(
        text(
            "INSERT INTO test_object_log (source, object_key, version, event_id) "
            "VALUES (:source, :object_key, :version, :event_id)"
        ),
        values,
    )
    db.execute(
        text(
            "INSERT INTO test_objects (source, object_key, version, event_id, data) "
            "VALUES (:source, :object_key, :version, :event_id, :data) "
            "ON CONFLICT (source, object_key) DO UPDATE SET version = excluded.version, "
            "event_id = excluded.event_id, data = excluded.data"
        ),
        values,
    )
    if payload.get("fail"):
        raise RuntimeError("the CRM is down")
    if payload.get("reject"):
        return Reject(payload["reject"])
    return {"synced": event.id}


@handler("audited", "*", stale=True)
def audit(event, db):
    db.execute(
        text("INSERT INTO test_audit (source, event_id, stale) VALUES (:s, :e, :stale)"),
        {"s": event.source, "e": event.id, "stale": event.stale},
    )
    if event.payload.get("audit_fail"):
        raise RuntimeError("the audit log is down")
    return {"audited": event.id, "stale": event.stale}
