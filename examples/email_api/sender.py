"""The ``email`` sender: deliver one queued email over SMTP, with a Message-ID from its key.

Settings, read when an email is sent (so a test or ``make run`` sets them at will):

- ``EMAIL_SMTP_HOST`` (default ``127.0.0.1``) and ``EMAIL_SMTP_PORT`` (default ``8025``);
- ``EMAIL_FROM`` (default ``idemhook example <noreply@example.com>``);
- ``EMAIL_SMTP_TIMEOUT`` seconds (default ``10``): connect and each reply. Keep it well
  under the kind's ``lease_seconds`` (docs/outbox.md).

SMTP has no idempotency key. What it has is the ``Message-ID`` header, which mail
systems and people use to recognise one message: derived from the outbox key, it is
the same on every attempt, so the one duplicate the outbox allows (a worker killed
after the server accepted the email and before the worker recorded it) arrives as a
second copy of the same message, not as a second email.
"""

from __future__ import annotations

import hashlib
import os
import smtplib
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

from idemhook import Message, Reject, sender

DEFAULT_FROM = "idemhook example <noreply@example.com>"


def message_id(key: str, from_address: str = DEFAULT_FROM) -> str:
    """The ``Message-ID`` of the email queued with outbox key ``key`` (same on every attempt)."""
    domain = parseaddr(from_address)[1].rpartition("@")[2] or "localhost"
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}.outbox@{domain}>"


def build(message: Message, from_address: str) -> EmailMessage:
    """The email for one outbox message (payload: ``to``, ``subject``, ``text``)."""
    payload = message.payload or {}
    try:
        to, subject, body = payload["to"], payload["subject"], payload["text"]
    except (KeyError, TypeError):
        raise Reject("the payload needs to, subject and text") from None
    email = EmailMessage()
    email["From"] = from_address
    email["To"] = to
    email["Subject"] = subject
    email["Date"] = formatdate(usegmt=True)
    email["Message-ID"] = message_id(message.key, from_address)
    email.set_content(body)
    return email


@sender("email", max_attempts=8, lease_seconds=60, backoff_seconds=5)
def send_email(message: Message) -> dict[str, str]:
    """Hand the email to the SMTP server; return its answer (stored as the message's result).

    A recipient or message the server refuses for good (5xx) is rejected: the message
    goes ``dead`` at once. Anything else (the server down, a 4xx) raises and is retried.
    """
    from_address = os.environ.get("EMAIL_FROM", DEFAULT_FROM)
    email = build(message, from_address)
    host = os.environ.get("EMAIL_SMTP_HOST", "127.0.0.1")
    port = int(os.environ.get("EMAIL_SMTP_PORT", "8025"))
    timeout = float(os.environ.get("EMAIL_SMTP_TIMEOUT", "10"))
    sender_address = parseaddr(from_address)[1]
    with smtplib.SMTP(host, port, timeout=timeout) as smtp:
        try:
            smtp.ehlo_or_helo_if_needed()
            _check(smtp.mail(sender_address), "MAIL FROM")
            _check(smtp.rcpt(parseaddr(email["To"])[1]), "RCPT TO")
            code, answer = smtp.data(email.as_bytes())
            _check((code, answer), "DATA")
        except smtplib.SMTPResponseException as exc:
            _check((exc.smtp_code, exc.smtp_error), "DATA")
            raise
    return {
        "smtp": f"{code} {answer.decode(errors='replace')}",
        "message_id": email["Message-ID"],
    }


def _check(reply: tuple[int, bytes], step: str) -> None:
    code, text = reply
    if 500 <= code < 600:
        raise Reject(f"the SMTP server refused {step}: {code} {text.decode(errors='replace')}")
    if not 200 <= code < 400:
        raise smtplib.SMTPResponseException(code, text)
