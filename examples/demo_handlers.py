"""The demo's handler: answers with what it saw. A real handler writes through ``db``."""

from __future__ import annotations

from idemhook import handler


@handler("demo", "*")
def acknowledge(event, db):
    """Return a small summary; it is stored as the event's result."""
    return {"handled": event.type, "fields": sorted(event.payload)}
