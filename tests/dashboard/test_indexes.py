"""Every dashboard page is served from indexes: no statement it runs scans a whole table.

The tables are filled with enough rows (and ANALYZEd) that PostgreSQL's planner
would pick a sequential scan wherever no index serves a query; every statement
each page sends is then EXPLAINed with its own parameters. The figure on 10
million rows is measured by ``python -m bench.dashboard`` (docs/performance.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, text

from idemhook._store.queries import encode_cursor
from tests.dashboard.conftest import Browser

EVENT_ROWS = 60_000
FAILURE_ROWS = 20_000
#: Mostly sent, as an outbox is: 300 pending (the newest), one in 1,000 dead.
MESSAGE_ROWS = 50_000
BIG_TABLES = {"processed_events", "delivery_failures", "outbox_messages"}

FILL = f"""
INSERT INTO processed_events (source, event_id, event_type, status, received_at,
    processed_at, payload, result, duplicate_count, last_seen_at)
SELECT (ARRAY['acme', 'open', 'batched'])[g % 3 + 1], 'e' || g,
    (ARRAY['contact.created', 'contact.updated', 'deal.won', 'invoice.paid'])[g % 4 + 1],
    CASE WHEN g % 500 = 0 THEN 'rejected' WHEN g % 50 = 0 THEN 'ignored' ELSE 'processed' END,
    now() - g * interval '40 seconds', now() - g * interval '40 seconds',
    jsonb_build_object('id', 'e' || g), jsonb_build_object('ok', true), g % 7 / 6,
    now() - g * interval '40 seconds'
FROM generate_series(1, {EVENT_ROWS}) AS g;
INSERT INTO delivery_failures (source, event_id, event_type, error, traceback, raw_body,
    payload, headers, permanent, failed_at)
SELECT (ARRAY['acme', 'open'])[g % 2 + 1], CASE WHEN g % 10 = 0 THEN 'lost' || g ELSE 'e' || g END,
    'contact.created', 'RuntimeError', 'Traceback', '\\x7b7d', '{{}}', '{{}}', false,
    now() - g * interval '2 minutes'
FROM generate_series(1, {FAILURE_ROWS}) AS g;
INSERT INTO outbox_messages (id, kind, key, payload, status, attempts, next_attempt_at,
    last_attempt_at, last_error, result, created_at, sent_at, source, event_id)
SELECT g, (ARRAY['email', 'crm'])[g % 2 + 1], 'acme:e' || g || ':' || 0,
    jsonb_build_object('to', 'user' || g || '@example.com'), s.status,
    CASE s.status WHEN 'dead' THEN 10 WHEN 'sent' THEN 1 ELSE 0 END,
    now() - g * interval '30 seconds' + interval '10 seconds', now() - g * interval '30 seconds',
    CASE s.status WHEN 'dead' THEN 'smtp raised SMTPDataError: 554 refused' END,
    CASE s.status WHEN 'sent' THEN jsonb_build_object('smtp', '250 ok') END,
    now() - g * interval '30 seconds',
    CASE s.status WHEN 'sent' THEN now() - g * interval '30 seconds' END,
    'acme', 'e' || g
FROM generate_series(1, {MESSAGE_ROWS}) AS g,
    LATERAL (SELECT CASE WHEN g % 1000 = 0 THEN 'dead' WHEN g <= 300 THEN 'pending'
        ELSE 'sent' END AS status) AS s;
ANALYZE processed_events;
ANALYZE delivery_failures;
ANALYZE outbox_messages;
"""
#: A cursor a day back into the keyset pages (as "Older »" hands them out).
DAY_BACK = encode_cursor(datetime.now(UTC) - timedelta(days=1), 2**62)

PAGES = (
    "/dashboard",
    "/dashboard/events",
    "/dashboard/events?source=acme",
    "/dashboard/events?source=acme&type=deal.won",
    "/dashboard/events?type=deal.won&status=processed",
    "/dashboard/events?status=rejected",
    "/dashboard/events?status=ignored&source=open",
    "/dashboard/events?since=2h&until=1h",
    "/dashboard/events?id=e4242",
    "/dashboard/events/acme/e4242",
    "/dashboard/events/acme/lost10",
    "/dashboard/replay/acme/e4242",
    "/dashboard/failures",
    "/dashboard/failures?all=1&source=acme",
    "/dashboard/failures?since=2h",
    "/dashboard/outbox",
    "/dashboard/outbox?status=pending",
    "/dashboard/outbox?status=sent",
    "/dashboard/outbox?status=dead",
    f"/dashboard/outbox?status=dead&cursor={DAY_BACK}",
    f"/dashboard/outbox?cursor={DAY_BACK}",
    "/dashboard/outbox/4242",
)


def _scans(plan: dict) -> Iterator[tuple[str, str]]:
    yield plan["Node Type"], plan.get("Relation Name", "")
    for child in plan.get("Plans", []):
        yield from _scans(child)


@pytest.fixture
def statements(app) -> Iterator[list[tuple[str, object]]]:
    """Every SELECT the app sends to the database while the test runs."""
    engine = app.extensions["idemhook.db"].engine
    seen: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("path", PAGES)
def test_no_page_reads_a_big_table_from_end_to_end(app, browser: Browser, statements, path):
    engine = app.extensions["idemhook.db"].engine
    # Filled on a connection of the test's own, without the app's statement timeout: on a
    # busy machine (a second test run beside this one) 60,000 rows may take longer.
    filler = create_engine(app.config["DATABASE_URL"])
    with filler.begin() as conn:
        conn.execute(text(FILL))
    filler.dispose()
    statements.clear()
    assert browser.get(path).status_code in (200, 303)
    ours = [(s, p) for s, p in statements if any(t in s for t in BIG_TABLES)]
    assert ours, "the page read none of the big tables"
    with engine.connect() as conn:
        for statement, parameters in ours:
            raw = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar()
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
            full = [rel for node, rel in _scans(plan) if node == "Seq Scan" and rel in BIG_TABLES]
            assert not full, f"{path}: a sequential scan of {full} in\n{statement}"
        conn.execute(text("SELECT 1"))
