"""Claim lanes (app/_store/lanes.py): a kept connection leaves each claim as it found it.

A lane's connection, cursor and handler session serve one claim after another.
What a user would notice if that went wrong: an event applied on a connection
left inside a transaction (its effects never committed, or committed by the
next event), ORM objects of one event seen by the next, a failure whose
rollback undid nothing, or connections that outlive ``Engine.dispose()``.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text

from idemhook import handler
from idemhook.testing import deliver
from tests.orm_effects import mapped_effect


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, pg_url, sqlite_url):
    return pg_url if request.param == "postgresql" else sqlite_url


def _only(app, func):
    registry = app.extensions["idemhook.registry"]
    registry.registrations.clear()
    registry.add("acme", "*", func)
    return app.extensions["idemhook.receiver"].claimer


def _effects(sql):
    return sorted(row[0] for row in sql("SELECT event_id FROM test_effects"))


def test_one_lane_serves_event_after_event_through_failures(make_app, sql):
    @handler("acme", "*")
    def write_then_maybe_fail(event, db):
        db.execute(
            text("INSERT INTO test_effects (source, event_id) VALUES (:s, :e)"),
            {"s": event.source, "e": event.id},
        )
        if event.payload.get("fail"):
            raise RuntimeError("boom")
        return {"ok": event.id}

    app = make_app()
    claimer = _only(app, write_then_maybe_fail)
    client = app.test_client()

    answers = [
        deliver(client, "acme", {"id": "l1", "type": "t"}).status_code,
        deliver(client, "acme", {"id": "l2", "type": "t", "fail": True}).status_code,
        deliver(client, "acme", {"id": "l3", "type": "t"}).status_code,
        deliver(client, "acme", {"id": "l1", "type": "t"}).json["status"],
    ]

    assert answers == [200, 500, 200, "duplicate"]
    # One connection did all of it, and what failed left nothing behind.
    assert len(claimer.database.lanes._idle) == 1
    assert _effects(sql) == ["l1", "l3"]
    assert [r[0] for r in sql("SELECT event_id FROM processed_events ORDER BY 1")] == ["l1", "l3"]
    assert [r[0] for r in sql("SELECT event_id FROM delivery_failures")] == ["l2"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_idle_lane_is_outside_any_transaction(make_app, sql, pg_url):
    @handler("acme", "*")
    def fail(event, db):
        db.execute(text("SELECT 1"))
        raise RuntimeError("boom")

    app = make_app()
    _only(app, fail)
    assert deliver(app.test_client(), "acme", {"id": "t1", "type": "t"}).status_code == 500

    # Seen from another connection: the kept one is idle, not "idle in transaction".
    states = sql(
        "SELECT state FROM pg_stat_activity "
        "WHERE application_name = 'idemhook-web' AND datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )
    assert states and {s[0] for s in states} == {"idle"}


def test_orm_objects_of_one_event_are_not_seen_by_the_next(make_app, sql):
    Effect = mapped_effect()
    seen: list[int] = []

    @handler("acme", "*")
    def add_effect(event, db):
        seen.append(len(db.identity_map) + len(db.new))
        db.add(Effect(event.source, event.id))
        return None

    app = make_app()
    _only(app, add_effect)
    client = app.test_client()
    for i in range(3):
        assert deliver(client, "acme", {"id": f"o{i}", "type": "t"}).status_code == 200

    assert seen == [0, 0, 0]
    assert _effects(sql) == ["o0", "o1", "o2"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_dispose_closes_the_kept_connections(make_app, pg_url):
    app = make_app(DATABASE_URL=pg_url)
    client = app.test_client()
    assert deliver(client, "acme", {"id": "d1", "type": "contact.updated"}).status_code == 200
    watcher = create_engine(pg_url)
    claimer = app.extensions["idemhook.receiver"].claimer
    [lane] = claimer.database.lanes._idle
    pid = lane.connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    count = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid").bindparams(pid=pid)
    try:
        with watcher.connect() as conn:
            before = conn.execute(count).scalar_one()
            conn.commit()  # pg_stat_activity is read once per transaction
            app.extensions["idemhook.db"].engine.dispose()
            for _ in range(100):  # the backend exits moments after its client hangs up
                after = conn.execute(count).scalar_one()
                conn.commit()
                if not after:
                    break
                time.sleep(0.05)
    finally:
        watcher.dispose()

    assert (before, after) == (1, 0)
    # The app keeps serving after a dispose: a new lane is opened.
    assert deliver(client, "acme", {"id": "d2", "type": "contact.updated"}).status_code == 200


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_app_dropped_without_dispose_gives_its_connections_back(make_app, pg_url):
    # make_app only empties the tables afterwards: an app it built would be kept alive.
    import gc

    from idemhook import create_app
    from tests.conftest import SOURCES

    app = create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": SOURCES})
    assert deliver(app.test_client(), "acme", {"id": "g1", "type": "t"}).status_code == 200
    [lane] = app.extensions["idemhook.receiver"].claimer.database.lanes._idle
    pid = lane.connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    del app, lane
    # Collected, the kept connection goes back to its pool and is closed with it, rather
    # than being reclaimed with SQLAlchemy's "non-checked-in connection" warning (an error
    # under this suite's warning filter). The app is in a reference cycle (its wsgi_app
    # middleware holds the app), so the first collection frees it and gives the kept
    # connection back to the engine's pool; the second frees the engine, closing it.
    gc.collect()
    gc.collect()
    watcher = create_engine(pg_url)
    try:
        with watcher.connect() as conn:
            for _ in range(100):
                alive = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
                ).scalar_one()
                conn.commit()
                if not alive:
                    break
                time.sleep(0.05)
    finally:
        watcher.dispose()
    assert alive == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_after_a_message_that_commits_itself_handlers_still_run_in_one_transaction(
    make_app, sql
):
    """``Lane.execute_committing`` (the key's lease): the message's own work is committed,
    and what handlers do next, by either path, is one transaction that a rollback undoes."""
    Effect = mapped_effect()
    app = make_app()
    lanes = app.extensions["idemhook.db"].lanes
    insert = "INSERT INTO test_effects (source, event_id) VALUES ('lane', :e)"
    with lanes.lane() as lane:
        lane.begin()
        lane.execute_committing(
            "INSERT INTO test_effects (source, event_id) VALUES ('lane', 'leased'); COMMIT; "
            "SELECT 1"
        )
        pid = lane.connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        # Nothing is open on the server until the handlers' first statement.
        assert sql("SELECT state FROM pg_stat_activity WHERE pid = :p", p=pid) == [("idle",)]
        lane.session.execute(text(insert), {"e": "direct"})  # straight to the lane's cursor
        lane.session.add(Effect("lane", "orm"))  # SQLAlchemy's own path
        lane.session.flush()
        assert sql("SELECT state FROM pg_stat_activity WHERE pid = :p", p=pid) == [
            ("idle in transaction",)
        ]
        lane.session.close()
        lane.rollback()
    assert _effects(sql) == ["leased"]
