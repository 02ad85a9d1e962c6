"""The fault kit: the tools the fault tests break things with, built once.

- :func:`sessions` lists this test database's PostgreSQL sessions of one process role
  (``application_name``: ``idemhook-web``, ``idemhook-worker``, ``idemhook-cli``;
  docs/operations.md), so a test waits on the exact session it means, never on a pattern
  another process (a second ``make test`` beside this one) could match: every run has
  its own database, and every role its own name.
- :func:`terminate` ends those sessions' backends (``pg_terminate_backend``), as a
  failover, an OOM kill of a backend or a pooler's timeout would.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

_SESSIONS = (
    "SELECT pid, application_name, state, wait_event_type, wait_event, query "
    "FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = :name AND pid <> pg_backend_pid()"
)


def sessions(url: URL | str, name: str, *, state: str | None = None) -> list[Any]:
    """The sessions of role ``name`` in ``url``'s database (only those in ``state``, if given)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(_SESSIONS), {"name": name}).all()
    finally:
        engine.dispose()
    return [row for row in rows if state is None or row.state == state]


def terminate(url: URL | str, pids: list[int]) -> int:
    """End the backends ``pids`` (``pg_terminate_backend``); how many were ended."""
    if not pids:
        return 0
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            ended = conn.execute(
                text("SELECT count(*) FROM unnest(CAST(:pids AS int[])) AS p(pid) "
                     "WHERE pg_terminate_backend(p.pid)"),
                {"pids": list(pids)},
            ).scalar_one()
    finally:
        engine.dispose()
    return int(ended)
