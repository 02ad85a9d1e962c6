"""The email-send API's handler: validate, record the email and its outbox message, together.

A client POSTs ``{"to", "subject", "text"}`` with an ``Idempotency-Key`` (the
``emails`` source, ``scheme = "idempotency-key"``, see ``webhooks.toml`` here). The
email row and the ``email`` outbox message are written in the claim's transaction:
both or neither. Every retry with the same key is a duplicate and gets the same
answer; the sender (``sender.py``) delivers the email once the claim commits.
``status(db, email_id)`` is what ``GET /v1/emails/<id>`` shows.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from idemhook import Reject, handler

IDEMHOOK_MIGRATIONS = Path(__file__).with_name("migrations")

#: An address as a sending API checks it: one @, no spaces or angle brackets.
_ADDRESS = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")
LIMITS = {"to": 320, "subject": 998, "text": 100_000}
#: outbox status -> what the API calls it.
STATUSES = {"pending": "queued", "sent": "sent", "dead": "failed"}


def validate(payload: Any) -> dict[str, str]:
    """Field errors of a request body (empty: valid)."""
    if not isinstance(payload, dict):
        return {"body": "must be a JSON object with to, subject and text"}
    errors = {}
    for field, limit in LIMITS.items():
        value = payload.get(field)
        if not isinstance(value, str) or not value.strip():
            errors[field] = "required: a non-empty string"
        elif len(value) > limit:
            errors[field] = f"at most {limit} characters"
    if "to" not in errors and not _ADDRESS.match(payload["to"]):
        errors["to"] = "not an email address"
    if "subject" not in errors and any(c in payload["subject"] for c in "\r\n"):
        errors["subject"] = "one line: no line breaks"
    return errors


@handler("emails", "*")
def queue_email(event, db):
    """Record the email and queue its sending; answer its id and ``queued``."""
    errors = validate(event.payload)
    if errors:
        # Issue 12's Response(400, {"errors": errors}) replaces this once it lands.
        raise Reject("invalid email: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    payload = event.payload
    outbox_id = event.outbox.add(
        "email",
        {"to": payload["to"], "subject": payload["subject"], "text": payload["text"]},
        key=f"email:{event.id}",
    )
    email_id = db.execute(
        text(
            "INSERT INTO emails (idempotency_key, recipient, subject, body, outbox_id, "
            "created_at) VALUES (:key, :to, :subject, :body, :outbox_id, :at) RETURNING id"
        ),
        {
            "key": event.id,
            "to": payload["to"],
            "subject": payload["subject"],
            "body": payload["text"],
            "outbox_id": outbox_id,
            "at": datetime.now(UTC),
        },
    ).scalar_one()
    return {"id": email_id, "status": "queued"}


def status(db, email_id: int) -> dict[str, Any] | None:
    """The email as ``GET /v1/emails/<id>`` shows it: queued, sent or failed, and when."""
    row = db.execute(
        text(
            "SELECT e.id, e.recipient, e.subject, m.status, m.sent_at, m.result, m.last_error "
            "FROM emails e JOIN outbox_messages m ON m.id = e.outbox_id WHERE e.id = :id"
        ),
        {"id": email_id},
    ).first()
    if row is None:
        return None
    result = row.result or {}
    return {
        "id": row.id,
        "to": row.recipient,
        "subject": row.subject,
        "status": STATUSES[row.status],
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "smtp": result.get("smtp") if isinstance(result, dict) else None,
        "error": row.last_error if row.status == "dead" else None,
    }
