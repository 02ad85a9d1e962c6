"""The benchmark's handler: one UPDATE of one row of the 10,000-row ``bench_accounts`` table."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import text

from idemhook import Event, handler

ACCOUNTS = 10_000

#: Created (and filled) by the bench before the servers start; the baseline runs the same UPDATE.
TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS bench_accounts "
    "(id INTEGER PRIMARY KEY, events BIGINT NOT NULL DEFAULT 0, last_event VARCHAR(255))",
    "INSERT INTO bench_accounts (id) SELECT g FROM generate_series(1, 10000) g "
    "ON CONFLICT DO NOTHING",
)
UPDATE_SQL = (
    "UPDATE bench_accounts SET events = events + 1, last_event = %(event_id)s "
    "WHERE id = %(account)s"
)

_update = text(
    "UPDATE bench_accounts SET events = events + 1, last_event = :event_id WHERE id = :account"
)


#: The handler does nothing but one statement on ``db``, and says so (docs/plugins.md): a
#: delivery then runs without the claim thread. ``python -m bench.run --watched-handler``
#: runs it watched, as a handler that does not say so.
DATABASE_ONLY = os.environ.get("BENCH_WATCHED_HANDLER") != "1"


@handler("bench", "*", database_only=DATABASE_ONLY)
@handler("bench_batch", "*", database_only=DATABASE_ONLY)
def count(event: Event, db: Any) -> dict[str, int]:
    """Count the event against its account (one row of 10,000)."""
    account = int(event.payload["account"])
    db.execute(_update, {"event_id": event.id, "account": account})
    return {"account": account}
