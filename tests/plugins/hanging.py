"""A handler that calls an API which never answers, for the hung-handler fault tests.

For source ``hanging``: it writes its effect (a test_effects row), then calls the "API"
at ``payload["api"]`` (``[host, port]``, a socket the test listens on) and waits for its
answer in Python, where no database timeout reaches it, as a handler whose e-mail or CRM
API hangs does. The test lets it go by closing the connection; a guard of
:data:`GUARD_SECONDS` ends the wait if the test never does.
"""

from __future__ import annotations

import socket

from sqlalchemy import text

from idemhook import handler

GUARD_SECONDS = 300.0


@handler("hanging", "*")
def call_api(event, db):
    db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:source, :event_id)"),
        {"source": event.source, "event_id": event.id},
    )
    host, port = event.payload["api"]
    with socket.create_connection((host, int(port)), timeout=GUARD_SECONDS) as api:
        api.sendall(f"POST /contacts {event.id}\r\n".encode())
        answer = api.recv(1024)  # nothing comes until the test closes the connection
    return {"api": answer.decode() or None}
