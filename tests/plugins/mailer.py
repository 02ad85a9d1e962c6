"""A handler that queues an email through the outbox (sent by examples.email_api.sender).

Each event of the ``mail`` source writes one ``test_effects`` row and adds one
``email`` outbox message from its payload (``to``, ``subject``, ``text``). A row in
``test_failures`` for the event makes the handler raise after both, so the test can
see that neither survives; ``"reject": true`` makes it return ``Reject`` after both;
``"kind"`` in the payload picks another kind.
"""

from __future__ import annotations

from sqlalchemy import text

from idemhook import Reject, handler


@handler("mail", "*")
def queue_email(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    message_id = event.outbox.add(
        event.payload.get("kind", "email"),
        {
            "to": event.payload.get("to", "ada@example.com"),
            "subject": event.payload.get("subject", f"event {event.id}"),
            "text": event.payload.get("text", "hello"),
        },
    )
    if event.payload.get("reject"):
        return Reject("the event says so")
    reason = db.execute(
        text("SELECT reason FROM test_failures WHERE event_id = :event_id"),
        {"event_id": event.id},
    ).scalar()
    if reason:
        raise RuntimeError(reason)
    return {"queued": message_id}
