"""The notification channels: ``LISTEN`` (the worker) and ``NOTIFY`` (after a commit)."""

from __future__ import annotations

from typing import Any

from psycopg2 import sql as pgsql

#: Notified once a claim with new received events has committed (asynchronous sources).
EVENTS_CHANNEL = "idemhook_events"
#: Notified by a transaction that added outbox messages, at its COMMIT.
OUTBOX_CHANNEL = "idemhook_outbox"


def listen(connection: Any, channels: tuple[str, ...]) -> None:
    """``LISTEN`` on each of ``channels`` on ``connection`` (psycopg2, autocommit)."""
    with connection.cursor() as cursor:
        for channel in channels:  # an identifier: no bound parameter for it
            cursor.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))


def notify_sql(channel: str) -> str:
    """A transaction that notifies ``channel`` (a name of ours, [a-z_]): no disk flush,
    a notification needs no durability."""
    return f"SET LOCAL synchronous_commit TO OFF; SELECT pg_notify('{channel}', '')"
