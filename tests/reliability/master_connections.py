"""A gunicorn master that uses the database before it forks, for the fork-safety tests.

:func:`open_connections` runs in the master (a ``when_ready`` hook: after
``--preload`` has built the app, before any worker is forked). It delivers one
event through the app, which leaves a kept claim connection ("lane") idle, and
runs a query on the app's engine, which leaves a pooled connection idle; then it
records what PostgreSQL shows of those two sessions (from a connection of its
own, closed again), so that a test can tell whether anything touched them later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psycopg2
from flask import Flask

from idemhook import create_app
from idemhook._store.database import get_db
from idemhook.testing import deliver
from idemhook.testing.postgres import connect_args

#: Apps built here stay referenced, as a start-up hook's or a plugin's would.
_kept: list[Flask] = []

SNAPSHOT = (
    "SELECT pid, state, query, state_change FROM pg_stat_activity WHERE pid = ANY(%s) ORDER BY pid"
)


def open_connections(app: Flask | None, record: str) -> None:
    """Open and keep connections of ``app`` (None: an app of the master's own); record them."""
    if app is None:  # without --preload: a start-up check builds the app in the master
        app = create_app()
        _kept.append(app)
    answer = deliver(app.test_client(), "whoami", {"id": f"master-{os.getpid()}"})
    if answer.status_code != 200:
        raise RuntimeError(f"the master's delivery failed: {answer.get_data(as_text=True)}")
    lane = answer.json["result"]["backend"]
    engine = get_db(app).engine
    with engine.connect() as conn:
        pooled = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    watcher = psycopg2.connect(**connect_args(engine.url))
    try:
        with watcher.cursor() as cur:
            cur.execute(SNAPSHOT, ([lane, pooled],))
            rows = cur.fetchall()
    finally:
        watcher.close()
    Path(record).write_text(
        json.dumps({"pid": os.getpid(), "lane": lane, "pooled": pooled, "sessions": _rows(rows)})
    )


def _rows(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [[pid, state, query, changed.isoformat()] for pid, state, query, changed in rows]
