"""Handlers of the test APIs (``idempotency-key`` sources): each run leaves a test_effects row.

The payload chooses what the operation does: ``{"decline": true}`` answers 402 as a
card processor would, ``{"fail": "..."}`` raises after writing its effect (rolled
back), ``{"reject": "..."}`` returns ``Reject``, ``{"sleep": s}`` keeps the operation
running for ``s`` seconds (the request in flight; its database session is then labelled
``test-handler-<pid>`` in pg_stat_activity, so a test can find the worker), and
``{"plain": value}`` returns the value itself instead of a ``Response``.
"""

from __future__ import annotations

import os
import time

from sqlalchemy import text

from idemhook import Reject, Response, handler


@handler("emails", "*")
@handler("charges", "*")
@handler("orders", "*")
def operate(event, db):
    row = {"source": event.source, "event_id": event.id}
    db.execute(text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"), row)
    count = db.execute(
        text("SELECT count(*) FROM test_effects WHERE source = :source"), row
    ).scalar()
    payload = event.payload
    if isinstance(payload.get("sleep"), int | float):
        db.execute(
            text("SELECT set_config('application_name', :name, true)"),  # this transaction
            {"name": f"test-handler-{os.getpid()}"},
        )
        time.sleep(payload["sleep"])
    if payload.get("fail"):
        raise RuntimeError(payload["fail"])
    if payload.get("reject"):
        return Reject(payload["reject"])
    if "plain" in payload:
        return payload["plain"]
    if payload.get("decline"):
        return Response(402, {"error": "card_declined", "client": event.client})
    return Response(
        201,
        {"id": count, "client": event.client, "to": payload.get("to")},
        {"Location": f"/v1/{event.source}/{count}", "X-Operation": "created"},
    )
