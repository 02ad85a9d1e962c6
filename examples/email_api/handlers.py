"""The email-send API: ``POST /v1/emails`` queues an email, ``GET /v1/emails/<id>`` shows it.

A client POSTs ``{"to", "subject", "text"}`` with an ``Idempotency-Key`` and its bearer
token (the ``emails`` source, ``scheme = "idempotency-key"``, ``path = "/v1/emails"``:
see ``webhooks.toml`` here). The handler writes the email row and the ``email`` outbox
message in the claim's transaction, both or neither, and answers ``202 {"id",
"status": "queued"}``; idemhook stores that answer with the key and replays it to every
retry (``Idempotent-Replayed: true``). The sender (``sender.py``) delivers the email
once the claim commits. A body with field errors is answered ``400``, as problem
details with an ``errors`` member, and queues nothing.

``GET /v1/emails/<id>`` (this module's ``IDEMHOOK_BLUEPRINT``) authenticates the client
as the POST does (``@api_view("emails")``) and shows an email only to the client that
queued it: ``queued``, ``sent`` (when, and the SMTP server's answer) or ``failed``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Blueprint
from sqlalchemy import JSON, text

from idemhook import Response, api_view, handler

IDEMHOOK_MIGRATIONS = Path(__file__).with_name("migrations")
#: GET /v1/emails/<id>, served beside the source's POST /v1/emails.
IDEMHOOK_BLUEPRINT = Blueprint("email_api", __name__)

#: An address as a sending API checks it: one @, no spaces or angle brackets.
_ADDRESS = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")
_ID = re.compile(r"^[0-9]{1,18}$")
LIMITS = {"to": 320, "subject": 998, "text": 100_000}
#: outbox status -> what the API calls it.
STATUSES = {"pending": "queued", "sent": "sent", "dead": "failed"}
#: Where the example's own problem types are explained (relative, as idemhook's are).
PROBLEMS = "docs/outbox.md"
TITLES = {"invalid_email": "Invalid email", "email_not_found": "Email not found"}


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


def problem(status: int, code: str, detail: str, **extra: Any) -> Response:
    """An RFC 9457 problem, shaped as idemhook's own (``error`` and ``message`` members too)."""
    body = {
        "type": f"{PROBLEMS}#{code}",
        "title": TITLES[code],
        "status": status,
        "detail": detail,
        "error": code,
        "message": detail,
        **extra,
    }
    return Response(status, body, {"Content-Type": "application/problem+json"})


def accepted(email_id: int) -> Response:
    """The answer to a queued email: 202, its id, and where its status is."""
    return Response(
        202, {"id": email_id, "status": "queued"}, {"Location": f"/v1/emails/{email_id}"}
    )


@handler("emails", "*")
def queue_email(event, db):
    """Record the email and queue its sending; answer 202 with its id, or 400."""
    errors = validate(event.payload)
    if errors:
        # The operation's answer: stored with the key and replayed like a 202. Nothing
        # was written, so nothing is queued; a corrected request takes a new key.
        fields = "; ".join(f"{field}: {why}" for field, why in errors.items())
        return problem(400, "invalid_email", f"The email is invalid ({fields}).", errors=errors)
    # A key is taken for key_ttl (24 h); reused after that, it is a new request to
    # idemhook, but here it still names the email it queued: answer that one again.
    known = db.execute(
        text("SELECT id FROM emails WHERE idempotency_key = :key"), {"key": event.id}
    ).scalar()
    if known is not None:
        return accepted(known)
    payload = event.payload
    outbox_id = event.outbox.add(
        "email",
        {"to": payload["to"], "subject": payload["subject"], "text": payload["text"]},
        key=f"email:{event.id}",
    )
    email_id = db.execute(
        text(
            "INSERT INTO emails (idempotency_key, client, recipient, subject, body, outbox_id, "
            "created_at) VALUES (:key, :client, :to, :subject, :body, :outbox_id, :at) "
            "RETURNING id"
        ),
        {
            "key": event.id,
            "client": event.client,
            "to": payload["to"],
            "subject": payload["subject"],
            "body": payload["text"],
            "outbox_id": outbox_id,
            "at": datetime.now(UTC),
        },
    ).scalar_one()
    return accepted(email_id)


@IDEMHOOK_BLUEPRINT.get("/v1/emails/<email_id>")
@api_view("emails")
def show_email(client, db, email_id: str):
    """``GET /v1/emails/<id>``: the email, if this client queued it; else 404."""
    shown = status(db, int(email_id), client=client) if _ID.match(email_id) else None
    if shown is None:
        return problem(
            404,
            "email_not_found",
            f"No email {email_id!r} was queued by this client: use the id a POST to "
            "/v1/emails answered.",
        )
    return shown


def status(db, email_id: int, *, client: str | None = None) -> dict[str, Any] | None:
    """The email as ``GET /v1/emails/<id>`` shows it to ``client``: queued, sent or failed."""
    row = db.execute(
        text(
            "SELECT e.id, e.recipient, e.subject, e.created_at, m.status, m.sent_at, m.result, "
            "m.last_error FROM emails e JOIN outbox_messages m ON m.id = e.outbox_id "
            "WHERE e.id = :id AND COALESCE(e.client, '') = :client"
        ).columns(result=JSON),  # parsed on SQLite too (the demo), as PostgreSQL's JSONB is
        # Client names are never empty: '' stands for the anonymous client (`secret`).
        {"id": email_id, "client": client or ""},
    ).first()
    if row is None:
        return None
    result = row.result or {}
    return {
        "id": row.id,
        "to": row.recipient,
        "subject": row.subject,
        "status": STATUSES[row.status],
        "created_at": _iso(row.created_at),
        "sent_at": _iso(row.sent_at),
        "smtp": result.get("smtp") if isinstance(result, dict) else None,
        "error": row.last_error if row.status == "dead" else None,
    }


def _iso(value: datetime | str | None) -> str | None:
    """A timestamp as ISO 8601 in UTC (SQLite hands back text; PostgreSQL a datetime)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()
