"""A named client's longest Idempotency-Key works end to end, outbox included.

A key may be 255 characters (MAX_KEY_LENGTH); a named client's is stored as
``<client>:<key>``, so every column that holds an event's id must take 255 + the
client's name and the colon: ``processed_events.event_id``, ``delivery_failures.event_id``
and the outbox message's ``event_id`` alike (migration 0011). Served by the shipped
gunicorn, on the database the real migrations built.
"""

from __future__ import annotations

import pytest
import requests

from idemhook import create_app
from idemhook.testing import signed
from tests.reliability.conftest import GUARD_SECONDS
from tests.servers import gunicorn
from tests.test_outbox import MAIL_SOURCES

pytestmark = [pytest.mark.gunicorn]

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


def test_a_named_clients_255_character_key_queues_its_outbox_message(make_app, db_url, sql):
    make_app(MAIL_API)  # empties the tables afterwards
    signer = create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": MAIL_API})
    key = "k" * 255
    payload = {"to": "ada@example.com", "subject": "welcome"}
    path, body, headers = signed(signer, "mail", payload, client="acme", key=key)
    with gunicorn(MAIL_API, db_url) as server:
        url = server.url + path.removeprefix("http://localhost")
        first = requests.post(url, data=body, headers=headers, timeout=GUARD_SECONDS)
        assert first.status_code == 200, first.text
        [message] = sql("SELECT id, kind, source, event_id FROM outbox_messages")
        assert first.json() == {"queued": message.id}
        assert (message.kind, message.source, message.event_id) == (
            "email", "mail", f"acme:{key}"
        )
        [row] = sql("SELECT event_id, status FROM processed_events WHERE source = 'mail'")
        assert (row.event_id, row.status) == (f"acme:{key}", "processed")
        # The retry is the stored answer, replayed; nothing is queued twice.
        again = requests.post(url, data=body, headers=headers, timeout=GUARD_SECONDS)
        assert (again.status_code, again.json()) == (200, first.json())
        assert again.headers["Idempotent-Replayed"] == "true"
    assert len(sql("SELECT id FROM outbox_messages")) == 1
    signer.extensions["idemhook.db"].engine.dispose()
