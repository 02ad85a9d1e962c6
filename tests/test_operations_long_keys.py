"""A named client's longest Idempotency-Key works end to end, outbox included.

A key may be 255 characters (MAX_KEY_LENGTH); a named client's is stored as
``<client>:<key>``, so every column that holds an event's id must take 255 + the
client's name and the colon: ``processed_events.event_id``, ``delivery_failures.event_id``
and the outbox message's ``event_id`` alike.
"""

from __future__ import annotations

from idemhook.testing import deliver
from tests.test_outbox import MAIL_SOURCES

#: An API whose operation (tests.plugins.mailer) queues an email through the outbox.
MAIL_API = {
    "plugins": MAIL_SOURCES["plugins"],
    "sources": {
        **MAIL_SOURCES["sources"],  # the recorder's sources (its handlers name them)
        "mail": {
            "scheme": "idempotency-key",
            "clients": {"acme": "acme-mail-secret-0123456"},
        },
    },
}


def test_a_named_clients_255_character_key_queues_its_outbox_message(make_app, sql):
    api = make_app(MAIL_API).test_client()
    key = "k" * 255
    payload = {"to": "ada@example.com", "subject": "welcome"}

    first = deliver(api, "mail", payload, as_client="acme", key=key)

    assert first.status_code == 200, first.get_data(as_text=True)
    [message] = sql("SELECT id, kind, source, event_id FROM outbox_messages")
    assert first.json == {"queued": message.id}
    assert (message.kind, message.source, message.event_id) == ("email", "mail", f"acme:{key}")
    [row] = sql("SELECT event_id, status FROM processed_events WHERE source = 'mail'")
    assert (row.event_id, row.status) == (f"acme:{key}", "processed")
    # The retry is the stored answer, replayed; nothing is queued twice.
    again = deliver(api, "mail", payload, as_client="acme", key=key)
    assert (again.status_code, again.json) == (200, first.json)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(sql("SELECT id FROM outbox_messages")) == 1
