"""Example: an email-send API that never sends an email twice (docs/outbox.md).

``sender.py`` delivers each queued email over SMTP (the standard library's
``smtplib``) with a ``Message-ID`` derived from the message's key, so a resend
after a crash is recognisably the same email. The API that queues them
(``POST /v1/emails`` with an ``Idempotency-Key``) is built on the
Idempotency-Key sources (docs/providers.md).
"""
