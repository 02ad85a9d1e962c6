"""Asynchronous sources' intake (``mode = "async"``): configuration, the claim, the answers.

The claim runs against the real PostgreSQL test database (and SQLite, the demo's);
the worker's side is ``tests/test_applying.py``, with real worker processes in
``tests/reliability/test_async_worker.py``.
"""

from __future__ import annotations

import select

import psycopg2
import pytest

from idemhook._config import sources
from idemhook._engine.applier import apply_due
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from idemhook.testing.postgres import connect_args
from tests.conftest import SECRET, SOURCES

ASYNC = {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id", "mode": "async"}
ASYNC_SOURCES = {
    "plugins": ["tests.plugins.queued"],
    "sources": {
        "queued": {**ASYNC, "event_type": "body:type"},
        "queued_batch": {**ASYNC, "batch": "array"},
        "ordered": {**ASYNC, "batch": "array", "order_key": "body:key", "ack_status": 200},
    },
}


@pytest.fixture
def queued(make_app):
    return make_app(ASYNC_SOURCES)


def load(table):
    return sources.load({"sources": {"s": table}}, max_body_bytes=1000).sources["s"]


# -- configuration ------------------------------------------------------------------------------


def test_a_source_is_synchronous_unless_it_says_async():
    source = load({"scheme": "none", "allow_unverified": True, "event_id": "body:id"})
    assert source.asynchronous is False
    queued = load({**ASYNC, "order_key": ["body:portalId", "body:objectId"]})
    assert queued.asynchronous and queued.ack_status == 202
    assert str(queued.order_key) == "[body:portalId, body:objectId]"
    assert (queued.retries.max_attempts, queued.retries.backoff_seconds) == (10, 5.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"mode": "later"},
            r'mode: "sync" \(handlers run in the request, the default\) or "async"',
        ),
        ({"mode": "async", "ack_status": 201}, r"ack_status: 202 \(the default\) or 200"),
        ({"mode": "async", "ack_status": True}, "ack_status"),
        ({"ack_status": 200}, r"ack_status: only an asynchronous source reads this key; set mode"),
        (
            {"order_key": "body:k", "max_attempts": 3},
            "order_key, max_attempts: only an asynchronous source reads these keys",
        ),
        ({"mode": "async", "order_key": "nowhere"}, r"order_key: expected 'body:<dotted.path>'"),
        ({"mode": "async", "max_attempts": 0}, "max_attempts: must be a positive whole number"),
        ({"mode": "async", "backoff_seconds": "5"}, "backoff_seconds: must be a positive number"),
        ({"mode": "async", "max_backoff_seconds": -1}, "max_backoff_seconds: must be a positive"),
    ],
)
def test_async_keys_are_checked_at_start_up(table, message):
    base = {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"}
    with pytest.raises(ConfigError, match=message):
        load({**base, **table})


# -- the claim and the answers ------------------------------------------------------------------


def test_a_new_event_is_claimed_received_with_its_payload_and_answered_202(queued, sql):
    answer = deliver(queued.test_client(), "queued", {"id": "a1", "type": "deal.created"})
    assert answer.status_code == 202
    assert answer.json == {"event_id": "a1", "status": "accepted"}
    [row] = sql("SELECT * FROM processed_events")
    assert (row.status, row.event_type, row.payload) == (
        "received",
        "deal.created",
        {"id": "a1", "type": "deal.created"},
    )
    assert (row.processed_at, row.result, row.attempts, row.duplicate_count) == (None, None, 0, 0)
    assert "X-Signature" not in row.headers and row.headers["Content-Type"] == "application/json"
    [queue] = sql("SELECT * FROM event_queue")
    assert (queue.id, queue.source, queue.order_key) == (row.id, "queued", None)
    assert queue.next_attempt_at == queue.received_at == row.received_at
    assert sql("SELECT count(*) FROM test_applied") == [(0,)]  # nothing ran


def test_a_duplicate_is_answered_with_the_events_state_at_once(queued, sql):
    client = queued.test_client()
    deliver(client, "queued", {"id": "d1", "type": "t"})
    again = deliver(client, "queued", {"id": "d1", "type": "t"})
    assert (again.status_code, again.json) == (202, {"event_id": "d1", "status": "accepted"})
    assert sql("SELECT duplicate_count FROM processed_events") == [(1,)]
    assert sql("SELECT count(*) FROM event_queue") == [(1,)]  # still one event to apply

    assert apply_due(queued) == 1
    done = deliver(client, "queued", {"id": "d1", "type": "t"})
    assert done.status_code == 200
    assert done.json == {"event_id": "d1", "status": "duplicate", "result": {"applied": "d1"}}
    assert sql("SELECT duplicate_count, status FROM processed_events") == [(2, "processed")]
    assert sql("SELECT count(*) FROM test_applied") == [(1,)]


def test_a_batch_is_accepted_whole_and_a_repeat_inside_it_is_one_claim(queued, sql):
    client = queued.test_client()
    answer = deliver(client, "queued_batch", [{"id": "b1"}, {"id": "b2"}, {"id": "b1"}])
    assert answer.status_code == 202
    assert answer.json == {
        "status": "accepted",
        "events": [{"event_id": e, "status": "accepted"} for e in ("b1", "b2", "b1")],
    }
    assert sql("SELECT event_id FROM processed_events ORDER BY id") == [("b1",), ("b2",)]
    apply_due(queued)
    again = deliver(client, "queued_batch", [{"id": "b2"}, {"id": "b3"}])
    assert again.status_code == 202  # b3 waits
    assert [e["status"] for e in again.json["events"]] == ["duplicate", "accepted"]
    apply_due(queued)
    done = deliver(client, "queued_batch", [{"id": "b1"}, {"id": "b3"}])
    assert done.status_code == 200 and done.json["status"] == "ok"  # nothing waits
    assert done.json["events"][1] == {
        "event_id": "b3",
        "status": "duplicate",
        "result": {"applied": "b3"},
    }


def test_ack_status_200_for_providers_that_want_it_and_order_keys_are_stored(queued, sql):
    answer = deliver(
        queued.test_client(), "ordered", [{"id": "o1", "key": "deal-7"}, {"id": "o2", "key": 7}]
    )
    assert answer.status_code == 200 and answer.json["status"] == "accepted"
    assert sql("SELECT event_id, order_key FROM processed_events ORDER BY id") == [
        ("o1", "deal-7"),
        ("o2", "7"),
    ]
    assert sql("SELECT order_key FROM event_queue ORDER BY id") == [("deal-7",), ("7",)]


@pytest.mark.parametrize(
    ("event", "code", "message"),
    [
        ({"id": "m1"}, "missing_order_key", "The order key is missing: expected it at body:key."),
        ({"id": "m1", "key": [1]}, "invalid_order_key", "The order key at body:key must be a"),
        ({"id": "m1", "key": ""}, "invalid_order_key", "The order key at body:key is empty."),
    ],
)
def test_an_event_without_a_usable_order_key_is_refused_and_nothing_stored(
    queued, sql, event, code, message
):
    answer = deliver(queued.test_client(), "ordered", [{"id": "fine", "key": "k"}, event])
    assert answer.status_code == 400 and answer.json["error"] == code
    assert answer.json["message"].startswith(message)
    assert sql("SELECT count(*) FROM processed_events") == [(0,)]


def test_the_claim_notifies_the_workers_when_it_commits_and_only_for_new_events(queued, pg_url):
    listener = psycopg2.connect(**connect_args(pg_url))
    listener.autocommit = True
    client = queued.test_client()
    try:
        listener.cursor().execute("LISTEN idemhook_events")
        deliver(client, "queued", {"id": "n1", "type": "t"})
        assert notifications(listener) == ["idemhook_events"]
        deliver(client, "queued", {"id": "n1", "type": "t"})  # a duplicate: nothing new
        deliver(client, "queued_batch", [{"id": "n2"}, {"id": "n3"}])  # one, for the batch
        assert notifications(listener) == ["idemhook_events"]
    finally:
        listener.close()


def test_a_burst_of_acks_shares_notifications_and_the_last_is_followed_by_one(queued, pg_url):
    # Each notification is a transaction and wakes every worker: a busy web process must not
    # send one per ack (the ack path lost a tenth of its requests/s to them in make bench),
    # yet the workers must always hear of the last commit.
    notifier = queued.extensions["idemhook.receiver"].acceptor.notifier
    listener = psycopg2.connect(**connect_args(pg_url))
    listener.autocommit = True
    try:
        listener.cursor().execute("LISTEN idemhook_events")
        for _ in range(1000):
            notifier.poke()  # what each committed ack does
        heard = []
        while got := notifications(listener):  # until 0.5 s pass without one
            heard += got
        assert 1 <= len(heard) <= 5  # shared: the pokes took about a millisecond
        notifier.poke()  # a lone ack later: notified too
        assert notifications(listener) == ["idemhook_events"]
    finally:
        listener.close()


def notifications(connection) -> list[str]:
    """The channels notified so far (the claim has committed when its answer is back)."""
    select.select([connection], [], [], 0.5)
    connection.poll()
    channels = [n.channel for n in connection.notifies]
    connection.notifies.clear()
    return channels


def test_the_synchronous_sources_beside_it_are_untouched(make_app, sql):
    config = {
        "plugins": [*SOURCES["plugins"], *ASYNC_SOURCES["plugins"]],
        "sources": {**SOURCES["sources"], **ASYNC_SOURCES["sources"]},
    }
    client = make_app(config).test_client()
    answer = deliver(client, "acme", {"id": "s1", "type": "contact.created"})  # mode "sync"
    assert answer.status_code == 200 and answer.json["status"] == "processed"
    assert sql("SELECT status FROM processed_events") == [("processed",)]
    assert sql("SELECT count(*) FROM event_queue") == [(0,)]


def test_on_sqlite_the_demo_accepts_and_applies_the_same_way(make_app, sqlite_url, sql):
    from idemhook import create_app

    app = create_app({"DATABASE_URL": sqlite_url, "IDEMHOOK_CONFIG": ASYNC_SOURCES})
    try:
        client = app.test_client()
        first = deliver(client, "ordered", [{"id": "q1", "key": "k"}, {"id": "q2", "key": "k"}])
        assert first.status_code == 200 and first.json["status"] == "accepted"
        assert apply_due(app) == 2
        again = deliver(client, "ordered", [{"id": "q1", "key": "k"}])
        assert again.json["events"] == [
            {"event_id": "q1", "status": "duplicate", "result": {"applied": "q1"}}
        ]
        with app.extensions["idemhook.db"].engine.connect() as conn:
            from sqlalchemy import text

            assert conn.execute(text("SELECT count(*) FROM event_queue")).scalar() == 0
            rows = conn.execute(text("SELECT event_id FROM test_applied ORDER BY n")).all()
            assert [r[0] for r in rows] == ["q1", "q2"]
            conn.execute(text("DELETE FROM test_applied"))
            conn.execute(text("DELETE FROM processed_events"))
            conn.commit()
    finally:
        app.extensions["idemhook.db"].engine.dispose()
