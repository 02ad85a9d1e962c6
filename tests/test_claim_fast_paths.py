"""The claim's fast paths (docs/performance.md) keep the claim's visible behaviour.

A batch first runs without savepoints and stores all results in one statement;
handlers share a session that the receiver never commits, so pending ORM changes
must still be written.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from idemhook import handler
from idemhook._values import jsontext
from idemhook.testing import deliver
from tests.conftest import SOURCES
from tests.orm_effects import mapped_effect


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, pg_url, sqlite_url):
    """Both supported backends."""
    return pg_url if request.param == "postgresql" else sqlite_url


def as_json(value):
    return json.loads(value) if isinstance(value, str) else value  # SQLite returns the text


def test_batch_stores_every_result_and_a_repeat_answers_its_original(client, sql):
    batch = [{"id": f"f{i}", "type": "contact.updated"} for i in range(3)]
    batch.append({"id": "f1", "type": "contact.updated"})

    response = deliver(client, "batched", batch)

    assert response.status_code == 200
    assert [(e["event_id"], e["status"], e["result"]) for e in response.json["events"]] == [
        ("f0", "processed", {"applied": "f0"}),
        ("f1", "processed", {"applied": "f1"}),
        ("f2", "processed", {"applied": "f2"}),
        ("f1", "duplicate", {"applied": "f1"}),
    ]
    rows = sql(
        "SELECT event_id, result, processed_at IS NOT NULL, duplicate_count "
        "FROM processed_events ORDER BY event_id"
    )
    assert [(r[0], as_json(r[1]), bool(r[2]), r[3]) for r in rows] == [
        ("f0", {"applied": "f0"}, True, 0),
        ("f1", {"applied": "f1"}, True, 1),
        ("f2", {"applied": "f2"}, True, 0),
    ]


def test_handlers_pending_orm_changes_are_written(make_app, sql):
    Effect = mapped_effect()

    @handler("acme", "*")
    def add_effect(event, db):
        db.add(Effect(event.source, event.id))  # never flushed by the handler itself
        return "added"

    app = make_app()
    registry = app.extensions["idemhook.registry"]
    registry.registrations.clear()
    registry.add("acme", "*", add_effect)

    response = deliver(app.test_client(), "acme", {"id": "orm1", "type": "contact.updated"})

    assert response.status_code == 200 and response.json["result"] == "added"
    assert sql("SELECT source, event_id FROM test_effects") == [("acme", "orm1")]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_lost_connections_are_replaced_and_the_delivery_retried(client, sql):
    def kill_receiver_connections():
        sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'idemhook-web'"
        )

    assert deliver(client, "acme", {"id": "k1", "type": "contact.updated"}).status_code == 200
    kill_receiver_connections()
    single = deliver(client, "acme", {"id": "k2", "type": "contact.updated"})
    kill_receiver_connections()
    batch = deliver(client, "batched", [{"id": "k3", "type": "x"}, {"id": "k4", "type": "x"}])
    kill_receiver_connections()
    duplicate = deliver(client, "acme", {"id": "k2", "type": "contact.updated"})

    assert (single.status_code, single.json["status"]) == (200, "processed")
    assert batch.status_code == 200
    assert [e["status"] for e in batch.json["events"]] == ["processed", "processed"]
    assert (duplicate.status_code, duplicate.json["status"]) == (200, "duplicate")
    assert [effects(sql, f"k{i}") for i in range(1, 5)] == [1, 1, 1, 1]


def effects(sql, event_id):
    return sql("SELECT count(*) FROM test_effects WHERE event_id = :e", e=event_id)[0][0]


@pytest.mark.parametrize("db_url", ["postgresql", "sqlite"], indirect=True)
def test_a_result_json_cannot_hold_fails_the_event_like_a_handler_error(make_app, sql):
    @handler("acme", "*")
    def infinite(event, db):
        db.execute(
            text("INSERT INTO test_effects (source, event_id) VALUES (:s, :e)"),
            {"s": event.source, "e": event.id},
        )
        if event.id.startswith("inf"):
            return {"ratio": float("inf")}  # not JSON (JSONB refuses "Infinity")
        return {"ratio": 1.0}

    app = make_app()
    registry = app.extensions["idemhook.registry"]
    registry.registrations.clear()
    registry.add("acme", "*", infinite)

    response = deliver(app.test_client(), "acme", {"id": "inf1", "type": "contact.updated"})

    assert response.status_code == 500
    assert response.json["error"] == "handler_failed"
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert effects(sql, "inf1") == 0
    failures = sql("SELECT event_id, error FROM delivery_failures")
    assert [f[0] for f in failures] == ["inf1"]
    assert "infinite raised ValueError: Out of range float values are not JSON" in failures[0][1]

    registry.add("batched", "*", infinite)
    batch = deliver(
        app.test_client(), "batched", [{"id": i, "type": "x"} for i in ("ok1", "inf2", "ok2")]
    )

    assert batch.status_code == 500
    assert [(e["event_id"], e["status"]) for e in batch.json["events"]] == [
        ("ok1", "processed"),
        ("inf2", "failed"),
        ("ok2", "processed"),
    ]
    assert [effects(sql, e) for e in ("ok1", "inf2", "ok2")] == [1, 0, 1]


def test_batch_stores_ignore_per_event_and_a_repeat_answers_it(idemhook):
    from tests.test_plugins import IGNORING, ledger

    kit = idemhook(IGNORING)
    batch = [
        {"id": "i1", "type": "order.paid", "first": "ignore"},
        {"id": "i2", "type": "order.paid"},
        {"id": "i1", "type": "order.paid", "first": "ignore"},
    ]

    response = kit.deliver("shop-batch", batch)

    assert response.status_code == 200
    assert [(e["event_id"], e["status"], e["result"]) for e in response.json["events"]] == [
        ("i1", "ignored", {"ignored": "first ignores it"}),
        ("i2", "processed", {"first": "i2"}),
        ("i1", "duplicate", {"ignored": "first ignores it"}),
    ]
    kit.assert_ignored("shop-batch", "i1", reason="first ignores it", duplicates=1)
    assert ledger(kit, "i1") == ["first"]
    assert ledger(kit, "i2") == ["first"]


def test_batch_reports_each_event_once_to_metrics_even_after_a_failure(client, sql):
    from tests.test_observability import value

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    sql("INSERT INTO test_failures VALUES ('n1', 'down')")
    before = client.get("/metrics").get_data(as_text=True)
    batch = [{"id": f"n{i}", "type": "contact.updated"} for i in range(3)]
    assert deliver(client, "batched", batch).status_code == 500  # n1 failed, reruns with savepoints
    assert deliver(client, "batched", [{"id": "n3", "type": "x"}, {"id": "n4", "type": "x"}])
    after = client.get("/metrics").get_data(as_text=True)

    events = "idemhook_events_total"
    assert moved(events, source="batched", type="contact.updated", outcome="processed") == 2
    assert moved(events, source="batched", type="contact.updated", outcome="failed") == 1
    assert moved(events, source="batched", type="x", outcome="processed") == 2
    assert moved("idemhook_claim_wait_seconds_count", source="batched") == 5
    assert moved("idemhook_handler_duration_seconds_count", source="batched") == 5


def _observe_text_statements(event, db):
    """What a handler sees of its ``text()`` statements, in a form two runs can compare."""
    seen = {}
    inserted = db.execute(
        text("INSERT INTO test_effects (source, event_id) VALUES (:s, :e), (:s, :f)"),
        {"s": event.source, "e": event.id, "f": event.id + "-b"},
    )
    seen["insert rowcount"] = inserted.rowcount
    seen["returns rows"] = inserted.returns_rows
    updated = db.execute(
        text("UPDATE test_effects SET source = :s WHERE event_id LIKE :p"),
        {"s": event.source, "p": event.id + "%", "unused": 1},
    )
    seen["update rowcount"] = updated.rowcount
    seen["percent literal"] = db.execute(text("SELECT 7 % 3")).scalar_one()
    rows = db.execute(
        text(
            "SELECT event_id, 1.50::numeric AS price, '{\"a\": [1]}'::jsonb AS doc, "
            "TIMESTAMPTZ '2026-01-02 03:04:05+00' AS at FROM test_effects "
            "WHERE event_id LIKE :p ORDER BY event_id"
        ),
        {"p": event.id + "%"},
    )
    seen["keys"] = list(rows.keys())
    seen["mappings"] = [
        {k: (type(v).__name__, str(v)) for k, v in row.items()} for row in rows.mappings()
    ]
    seen["first"] = tuple(db.execute(text("SELECT 1 AS one, 'x' AS two")).first())
    seen["none"] = db.execute(
        text("SELECT 1 FROM test_effects WHERE event_id = :e"), {"e": "absent"}
    ).scalar_one_or_none()
    seen["scalars"] = (
        db.execute(
            text("SELECT event_id FROM test_effects WHERE event_id LIKE :p ORDER BY 1"),
            {"p": event.id + "%"},
        )
        .scalars()
        .all()
    )
    seen["result type"] = type(inserted).__name__
    return seen


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_handlers_text_statements_answer_alike_on_the_direct_path_and_sqlalchemys(make_app):
    """Handlers' ``text()`` statements go straight to the lane's cursor when nothing would
    see the difference (idemhook._store.lanes.Lane.run_text): what a handler gets back is
    what SQLAlchemy's own path gives it, which a listener on the engine forces."""
    from sqlalchemy import event as sa_event

    app = make_app()
    registry = app.extensions["idemhook.registry"]
    registry.registrations.clear()
    registry.add("acme", "*", _observe_text_statements)

    direct = deliver(app.test_client(), "acme", {"id": "d1", "type": "x"})
    engine = app.extensions["idemhook.db"].engine
    sa_event.listen(engine, "before_cursor_execute", lambda *args: None)
    through = deliver(app.test_client(), "acme", {"id": "d2", "type": "x"})

    assert direct.status_code == through.status_code == 200
    seen_direct, seen_through = direct.json["result"], through.json["result"]
    assert seen_direct.pop("result type") == "Rows"
    assert seen_through.pop("result type") == "CursorResult"
    rename = json.loads(json.dumps(seen_through).replace("d2", "d1"))
    assert seen_direct == rename
    assert seen_direct["update rowcount"] == 2 and seen_direct["percent literal"] == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_direct_statements_error_is_sqlalchemys_and_fails_the_event(make_app, sql):
    from sqlalchemy.exc import DataError

    caught = []

    @handler("acme", "*")
    def divide(event, db):
        insert = text("INSERT INTO test_effects (source, event_id) VALUES (:s, :e)")
        db.execute(insert, {"s": event.source, "e": event.id})
        try:
            db.execute(text("SELECT 1 / :zero"), {"zero": 0})
        except DataError as exc:
            caught.append(type(exc.orig).__name__)
            raise

    app = make_app()
    registry = app.extensions["idemhook.registry"]
    registry.registrations.clear()
    registry.add("acme", "*", divide)

    response = deliver(app.test_client(), "acme", {"id": "u1", "type": "x"})

    assert response.status_code == 500 and response.json["error"] == "handler_failed"
    assert caught == ["DivisionByZero"]
    assert effects(sql, "u1") == 0
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    # The lane is usable again: the next delivery applies.
    registry.registrations.clear()
    registry.add("acme", "*", _observe_text_statements)
    assert deliver(app.test_client(), "acme", {"id": "u2", "type": "x"}).status_code == 200


@pytest.mark.parametrize("db_url", ["postgresql", "sqlite"], indirect=True)
def test_a_batchs_failed_and_rejected_events_are_undone_alone_and_no_handler_runs_twice(
    make_app, sql
):
    """A batch is claimed by one statement on PostgreSQL; each event's handlers still run in
    a savepoint of their own, sent with their first statement (direct or SQLAlchemy's)."""
    from idemhook import Reject

    Effect = mapped_effect()
    calls = []

    @handler("batched", "*")
    def mixed(event, db):
        calls.append(event.id)
        kind = event.payload["kind"]
        if kind == "orm":
            db.add(Effect(event.source, event.id))
            return "orm"
        db.execute(
            text("INSERT INTO test_effects (source, event_id) VALUES (:s, :e)"),
            {"s": event.source, "e": event.id},
        )
        if kind == "fail-after-write":
            raise RuntimeError("after its write")
        if kind == "reject":
            return Reject("not for us")
        return "text"

    @handler("batched", "early.*")
    def fails_first(event, db):
        calls.append(event.id + "!")
        raise RuntimeError("before any statement")

    config = copy.deepcopy(SOURCES)
    config["sources"]["batched"]["max_batch"] = 10
    app = make_app(config)
    registry = app.extensions["idemhook.registry"]
    registry.registrations.clear()
    registry.add("batched", "early.*", fails_first)
    registry.add("batched", "*", mixed)
    batch = [
        {"id": "b1", "type": "x", "kind": "text"},
        {"id": "b2", "type": "early.x", "kind": "text"},
        {"id": "b3", "type": "x", "kind": "orm"},
        {"id": "b4", "type": "x", "kind": "fail-after-write"},
        {"id": "b5", "type": "x", "kind": "reject"},
        {"id": "b4", "type": "x", "kind": "fail-after-write"},
        {"id": "b6", "type": "x", "kind": "text"},
    ]

    response = deliver(app.test_client(), "batched", batch)

    assert response.status_code == 500
    assert [(e["event_id"], e["status"]) for e in response.json["events"]] == [
        ("b1", "processed"),
        ("b2", "failed"),
        ("b3", "processed"),
        ("b4", "failed"),
        ("b5", "rejected"),
        ("b4", "failed"),
        ("b6", "processed"),
    ]
    assert calls == ["b1", "b2!", "b3", "b4", "b5", "b6"]  # each once, in order
    assert sorted(r[0] for r in sql("SELECT event_id FROM test_effects")) == ["b1", "b3", "b6"]
    claims = sql("SELECT event_id, status FROM processed_events ORDER BY event_id")
    assert [tuple(r) for r in claims] == [
        ("b1", "processed"),
        ("b3", "processed"),
        ("b5", "rejected"),
        ("b6", "processed"),
    ]
    failed = sorted(r[0] for r in sql("SELECT event_id FROM delivery_failures"))
    assert failed == ["b2", "b4", "b4", "b5"]  # each failed occurrence, run once

    calls.clear()
    again = deliver(app.test_client(), "batched", batch)

    assert [e["status"] for e in again.json["events"]] == [
        "duplicate",
        "failed",
        "duplicate",
        "failed",
        "duplicate",
        "failed",
        "duplicate",
    ]
    assert calls == ["b2!", "b4"]


def test_a_single_events_body_is_stored_as_its_payload_as_the_sender_wrote_it(client, sql):
    """A single event's payload is its body's own JSON text (a byte-order mark dropped),
    not the body parsed and serialised again: the same document, and on PostgreSQL the
    numbers as the sender wrote them. A duplicate is still one."""
    raw = (
        '\ufeff{\n  "id": "evt_text",\n  "type": "contact.updated",\n'
        '  "amount": 1.50, "big": 1E2, "name": "Zoë", "nested": {"a": [1, 2.0]}\n}'
    ).encode()
    first = deliver(client, "acme", raw)
    assert first.status_code == 200 and first.json["status"] == "processed"
    assert deliver(client, "acme", raw).json["status"] == "duplicate"
    [(payload,)] = sql("SELECT payload FROM processed_events WHERE event_id = 'evt_text'")
    assert as_json(payload) == json.loads(raw.decode("utf-8-sig"))
    if client.application.extensions["idemhook.db"].engine.dialect.name == "postgresql":
        [(amount, big, same)] = sql(
            "SELECT payload->>'amount', payload->>'big', payload = CAST(:raw AS jsonb) "
            "FROM processed_events WHERE event_id = 'evt_text'",
            raw=raw.decode("utf-8-sig"),
        )
        assert (amount, big, same) == ("1.50", "100", True)


def test_a_batchs_events_are_stored_as_parsed(client, sql):
    """A batch's events are parts of the body: each is stored serialised from its parse."""
    raw = b'[{"id": "b_text", "type": "contact.updated", "amount": 1.50}]'
    assert deliver(client, "batched", raw).status_code == 200
    [(payload,)] = sql("SELECT payload FROM processed_events WHERE event_id = 'b_text'")
    assert as_json(payload) == {"id": "b_text", "type": "contact.updated", "amount": 1.5}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(value=_JSON)
def test_json_text_for_storage_is_what_the_standard_encoder_writes(value):
    """The payload's encoder made once (jsontext._lenient) writes exactly what
    ``json.JSONEncoder`` with the same options writes, NaN and infinities included."""
    standard = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    assert jsontext._lenient(value) == standard.encode(value)


def test_a_circular_value_is_refused_as_before():
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        jsontext.dumps(circular)
    assert jsontext.dumps({"still": "served"}) == '{"still":"served"}'
