"""Example: an email-send API that never sends an email twice (docs/outbox.md).

``handlers.py`` is the API: ``POST /v1/emails`` with an ``Idempotency-Key`` (an
``idempotency-key`` source, docs/idempotency-keys.md) records the email and its outbox
message in one transaction and answers ``202``, replayed to every retry;
``GET /v1/emails/<id>`` (the plugin's own route, docs/plugins.md) shows it queued, sent
or failed. ``sender.py`` delivers each queued email over SMTP (the standard library's
``smtplib``) with a ``Message-ID`` derived from the message's key, so a resend after a
crash is recognisably the same email.
"""
