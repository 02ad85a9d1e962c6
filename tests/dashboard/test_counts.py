"""Bounded counts: exact up to the bound, the planner's estimate past it, and saying which."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from idemhook import create_app
from idemhook._store.models import processed_events
from idemhook._web.dashboard.counts import Count, approximately, bounded_count


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (812, "810"),
        (999, "1k"),
        (48_213, "48k"),
        (999_999, "1M"),
        (1_234_567, "1.2M"),
        (10_400_000, "10M"),
        (3_500_000_000, "3.5G"),
    ],
)
def test_approximately_keeps_two_significant_figures(value, shown):
    assert approximately(value) == shown


def test_counts_say_whether_they_are_exact():
    assert str(Count(12_345)) == "12,345"
    assert str(Count(12_345, exact=False)) == "≈ 12k"
    assert str(Count(10_000, exact=False, at_least=True)) == "≥ 10,000"
    total = Count(5) + Count(7, exact=False)
    assert (total.value, total.exact) == (12, False)


def test_bounded_count_is_exact_up_to_the_cap_then_estimated(app, sql):
    sql(
        "INSERT INTO processed_events (source, event_id, event_type, status, received_at, "
        "last_seen_at) SELECT 'acme', 'e' || g, 't', 'processed', now(), now() "
        "FROM generate_series(1, 3000) AS g"
    )
    sql("ANALYZE processed_events")
    query = select(processed_events.c.id).where(processed_events.c.source == "acme")
    with app.extensions["idemhook.db"].session() as session:
        assert bounded_count(session, query, cap=5000) == Count(3000)
        estimated = bounded_count(session, query, cap=100)
    assert not estimated.exact and not estimated.at_least
    assert 2000 < estimated.value < 4500  # the planner's statistics, not a count


def test_on_sqlite_past_the_cap_is_a_lower_bound(sqlite_url):
    app = create_app({"DATABASE_URL": sqlite_url, "IDEMHOOK_CONFIG": {}})
    engine = app.extensions["idemhook.db"].engine
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO processed_events (source, event_id, event_type, status, received_at, "
            "last_seen_at, duplicate_count, replay_count) VALUES "
            + ", ".join(
                f"('acme', 's{n}', 't', 'processed', '2026-01-01', '2026-01-01', 0, 0)"
                for n in range(30)
            )
        )
    try:
        with app.extensions["idemhook.db"].session() as session:
            query = select(processed_events.c.id)
            assert bounded_count(session, query, cap=50) == Count(30)
            assert bounded_count(session, query, cap=10) == Count(10, exact=False, at_least=True)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM processed_events")
        engine.dispose()
