"""The ready SQL of docs/querying.md runs, and the indexes serve it (EXPLAIN on 200k rows)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from idemhook import create_app
from idemhook._store import migrate
from idemhook.testing import postgres

DOC = Path(__file__).resolve().parent.parent / "docs" / "querying.md"
QUERIES = {
    m.group(1): m.group(0)
    for m in re.finditer(r"-- name: (\w+)\n.*?;", DOC.read_text(), flags=re.S)
}

#: The indexes each documented query must use: one of each inner set.
EXPECTED: dict[str, list[set[str]]] = {
    "last_hour_by_type": [{"ix_processed_events_received_at_id"}],
    "source_type_per_hour": [{"ix_processed_events_source_event_type_received_at"}],
    "one_event": [{"uq_processed_events_source_event_id"}],
    "retry_distribution": [{"ix_processed_events_received_at_id"}],
    "most_retried": [{"ix_processed_events_received_at_id"}],
    "failures_without_success": [
        # The window's range, or the (source, event_id) order the grouping wants.
        {"ix_delivery_failures_failed_at_id", "ix_delivery_failures_source_event_id"},
        {"uq_processed_events_source_event_id"},
    ],
    "p95_processing_delay": [{"ix_processed_events_received_at_id"}],
}

EVENTS = 200_000
FAILURES = 30_000

SEED = [
    f"""
    INSERT INTO processed_events (source, event_id, event_type, status, received_at,
        processed_at, payload, result, duplicate_count, last_seen_at)
    SELECT (ARRAY['acme', 'stripe', 'github', 'shopify', 'close'])[1 + i % 5],
           'evt_' || i,
           'contact.' || (i % 20),
           CASE WHEN i % 10 = 0 THEN 'ignored' ELSE 'processed' END,
           now() - (i * interval '30 days' / {EVENTS}),
           now() - (i * interval '30 days' / {EVENTS}) + (i % 97) * interval '1 ms',
           jsonb_build_object('id', 'evt_' || i),
           NULL,
           CASE WHEN i % 7 = 0 THEN i % 5 ELSE 0 END,
           now() - (i * interval '30 days' / {EVENTS})
    FROM generate_series(1, {EVENTS}) AS i
    """,
    f"""
    INSERT INTO delivery_failures (source, event_id, event_type, error, raw_body, failed_at)
    SELECT 'acme', 'evt_' || (i * 37), 'contact.1', 'x raised RuntimeError', '\\x7b7d',
           now() - (i * interval '30 days' / {FAILURES})
    FROM generate_series(1, {FAILURES}) AS i
    """,
    "ANALYZE processed_events",
    "ANALYZE delivery_failures",
]


@pytest.fixture(scope="module")
def big(pg_server) -> Iterator[Engine]:
    """A database of its own with 200k events over 30 days and 30k failures."""
    url = postgres.create_database(pg_server)
    app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": {}})
    migrate.upgrade(app)
    app.extensions["idemhook.db"].engine.dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in SEED:
            conn.execute(text(statement))
    yield engine
    engine.dispose()
    postgres.drop_database(url)


def _indexes(plan: Any) -> set[str]:
    found = set()
    if isinstance(plan, dict):
        if "Index Name" in plan:
            found.add(plan["Index Name"])
        for value in plan.values():
            found |= _indexes(value)
    elif isinstance(plan, list):
        for item in plan:
            found |= _indexes(item)
    return found


def test_every_documented_query_is_checked():
    assert set(QUERIES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_documented_query_runs_and_uses_its_index(big, name):
    with big.connect() as conn:
        conn.execute(text(QUERIES[name])).all()  # it runs and returns rows
        plan = conn.execute(text("EXPLAIN (FORMAT JSON) " + QUERIES[name])).scalar()
    used = _indexes(plan)
    for alternatives in EXPECTED[name]:
        assert alternatives & used, f"{name} used {used or 'no index'}, not {alternatives}"


def test_failures_without_success_finds_exactly_the_unresolved(big):
    with big.connect() as conn:
        rows = conn.execute(text(QUERIES["failures_without_success"])).all()
    # Failure i (of event evt_<37 i>, source acme) is i * 30 days / FAILURES old; the
    # event has a claim row from acme only when 37 i <= EVENTS and is a multiple of 5.
    window = FAILURES * 7 // 30
    expected = [i for i in range(1, window) if i % 5 != 0 or 37 * i > EVENTS]
    assert sorted(int(r.event_id[4:]) // 37 for r in rows) == expected
