"""The outbox in one process: added iff the claim commits, one sender step at a time, on PostgreSQL.

The delivery loop runs here step by step (``Delivery.step``) with senders written
in the test, so each rule (sent, retried with backoff, dead at the limit,
rejected, a lost lease, a stop) is seen in isolation; tests/reliability/
test_outbox_worker.py runs real worker processes against a real SMTP server.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from idemhook import create_app
from idemhook._contract import (
    Reject,
)
from idemhook._engine.outbox import add_message
from idemhook._engine.registry import (
    Sender,
)
from idemhook._engine.sender import Delivery
from idemhook._engine.worker import Worker, backoff
from idemhook._store.outbox import Start
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from tests.conftest import SECRET, SOURCES

MAIL_SOURCES = {
    "plugins": [*SOURCES["plugins"], "tests.plugins.mailer", "examples.email_api.sender"],
    "sources": {
        **SOURCES["sources"],
        "mail": {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"},
    },
}


@pytest.fixture
def app(make_app):
    """The receiver with the mail source, its outbox handler and the example's email sender."""
    return make_app(MAIL_SOURCES)


def messages(sql):
    return sql(
        "SELECT id, kind, key, status, attempts, source, event_id, payload, result, last_error "
        "FROM outbox_messages ORDER BY id"
    )


def add(app, count=1, kind="email", payload=None, key="k"):
    """Add ``count`` messages in one committed transaction (as a handler's claim would)."""
    engine = app.extensions["idemhook.db"].engine
    with engine.begin() as conn:
        return [
            add_message(conn, kind, payload or {"n": n}, f"{key}{n}") for n in range(count)
        ]


def delivery(app, func, **policy):
    """A Delivery of kind ``email`` by ``func`` (quick backoff unless told otherwise)."""
    policy = {"backoff_seconds": 0.01, "max_backoff_seconds": 0.02, **policy}
    return Delivery(app.extensions["idemhook.db"], {"email": Sender("email", func, **policy)})


def idle_worker(work):
    return Worker([work], listen_url=None)


def make_due(sql):
    """Skip the waits: every pending message is due now (a backoff or a lease has passed)."""
    sql("UPDATE outbox_messages SET next_attempt_at = now() - interval '1 second'")


# -- added in the claim's transaction --------------------------------------------------------


def test_a_handlers_message_is_added_with_its_claim_and_a_stable_key(client, sql):
    assert deliver(client, "mail", {"id": "m1", "to": "ada@example.com"}).status_code == 200
    [row] = messages(sql)
    assert (row.kind, row.key, row.status, row.attempts) == ("email", "mail:m1:0", "pending", 0)
    assert (row.source, row.event_id) == ("mail", "m1")
    assert row.payload == {"to": "ada@example.com", "subject": "event m1", "text": "hello"}
    # The provider's redelivery is a duplicate: no handler runs, no second message.
    assert deliver(client, "mail", {"id": "m1"}).json["status"] == "duplicate"
    assert len(messages(sql)) == 1


def test_a_handler_that_raises_after_adding_leaves_no_message(client, sql):
    sql("INSERT INTO test_failures (event_id, reason) VALUES ('m2', 'boom')")
    assert deliver(client, "mail", {"id": "m2"}).status_code == 500
    assert messages(sql) == []
    assert sql("SELECT count(*) FROM test_effects") == [(0,)]
    sql("DELETE FROM test_failures")
    assert deliver(client, "mail", {"id": "m2"}).status_code == 200  # the provider's retry
    assert [r.key for r in messages(sql)] == ["mail:m2:0"]


def test_a_rejected_event_leaves_no_message(client, sql):
    assert deliver(client, "mail", {"id": "m5", "reject": True}).json["status"] == "rejected"
    assert messages(sql) == []


def test_in_a_batch_a_failed_event_takes_only_its_own_message_with_it(make_app, sql):
    config = {
        **MAIL_SOURCES,
        "sources": {
            **MAIL_SOURCES["sources"],
            "mail": {**MAIL_SOURCES["sources"]["mail"], "batch": "array"},
        },
    }
    client = make_app(config).test_client()
    sql("INSERT INTO test_failures (event_id, reason) VALUES ('b2', 'boom')")
    answer = deliver(client, "mail", [{"id": "b1"}, {"id": "b2"}, {"id": "b3"}])
    assert answer.status_code == 500
    assert [r.event_id for r in messages(sql)] == ["b1", "b3"]


def test_a_replay_adds_no_second_message_for_the_same_key(app, client, sql):
    deliver(client, "mail", {"id": "m3"})
    result = app.test_cli_runner().invoke(args=["events", "replay", "mail", "m3", "--force"])
    assert result.exit_code == 0, result.output
    [row] = messages(sql)
    assert row.key == "mail:m3:0"
    assert sql("SELECT count(*) FROM test_effects") == [(2,)]  # the handler did run again


def test_the_same_kind_and_key_twice_is_one_message(app, sql):
    engine = app.extensions["idemhook.db"].engine
    with engine.begin() as conn:
        first = add_message(conn, "email", {"a": 1}, "order-42")
        again = add_message(conn, "email", {"a": 2}, "order-42")
        other_kind = add_message(conn, "crm", {"a": 3}, "order-42")
    assert first == again != other_kind
    assert [(r.kind, r.payload) for r in messages(sql)] == [("email", {"a": 1}), ("crm", {"a": 3})]


def test_an_unknown_kind_fails_the_event_naming_the_registered_senders(client, sql):
    response = deliver(client, "mail", {"id": "m4", "kind": "emial"})
    assert response.status_code == 500
    [failure] = sql("SELECT error FROM delivery_failures")
    assert "LookupError" in failure.error and "'emial'" in failure.error
    assert "registered: email" in failure.error
    assert messages(sql) == []


def test_event_outbox_outside_a_handler_says_where_it_works():
    from idemhook import Event

    event = Event("mail", "x", None, {}, {}, datetime.now(UTC))
    with pytest.raises(RuntimeError, match="only inside a handler"):
        event.outbox.add("email", {})


# -- one delivery step at a time -------------------------------------------------------------


def test_a_sender_that_returns_marks_the_message_sent_with_its_result(app, sql):
    [message_id] = add(app, payload={"to": "bob@example.com"})
    got = []

    def send(message):
        got.append(message)
        return {"provider_id": "p-1"}

    work = delivery(app, send)
    assert work.step(idle_worker(work)) == 0.0
    [message] = got
    assert (message.id, message.kind, message.key) == (message_id, "email", "k0")
    assert message.attempts == 1
    assert message.payload == {"to": "bob@example.com"}
    [row] = sql("SELECT status, result, sent_at, leased_by, attempts FROM outbox_messages")
    assert (row.status, row.result, row.leased_by, row.attempts) == (
        "sent",
        {"provider_id": "p-1"},
        None,
        1,
    )
    assert row.sent_at is not None
    assert work.step(idle_worker(work)) is None  # nothing left: wait for a notification


def test_a_failing_sender_backs_off_then_the_message_goes_dead_with_the_last_error(app, sql):
    add(app)
    calls = []

    def send(message):
        calls.append(message.attempts)
        raise ConnectionRefusedError(f"attempt {message.attempts}: nobody listens")

    work = delivery(app, send, max_attempts=3, backoff_seconds=30, max_backoff_seconds=60)
    worker = idle_worker(work)
    work.step(worker)
    [row] = sql(
        "SELECT status, attempts, last_error, EXTRACT(EPOCH FROM next_attempt_at - now()) AS wait "
        "FROM outbox_messages"
    )
    assert (row.status, row.attempts) == ("pending", 1)
    assert "ConnectionRefusedError: attempt 1: nobody listens" in row.last_error
    assert 15 <= row.wait <= 30  # the first backoff: half of 30 s fixed, half jitter
    assert 14 <= work.step(worker) <= 30  # the worker knows when to look again
    for _attempt in (2, 3):
        make_due(sql)
        work.step(worker)
    [row] = sql("SELECT status, attempts, last_error FROM outbox_messages")
    assert (row.status, row.attempts) == ("dead", 3)
    assert "attempt 3: nobody listens" in row.last_error
    make_due(sql)
    work.step(worker)
    assert calls == [1, 2, 3]  # dead is final: never handed to the sender again


def test_reject_marks_the_message_dead_at_once(app, sql):
    add(app)

    def send(message):
        raise Reject("no such mailbox")

    work = delivery(app, send, max_attempts=5)
    work.step(idle_worker(work))
    [row] = sql("SELECT status, attempts, result, last_error FROM outbox_messages")
    assert (row.status, row.attempts, row.result) == ("dead", 1, {"rejected": "no such mailbox"})
    assert "rejected the message: no such mailbox" in row.last_error


def test_a_message_whose_worker_died_on_every_attempt_goes_dead_without_a_send(app, sql):
    add(app)
    sql("UPDATE outbox_messages SET attempts = 3, leased_by = 'gone:1:1'")  # 3 expired leases
    sent = []
    work = delivery(app, sent.append, max_attempts=3)
    work.step(idle_worker(work))
    assert sent == []
    [row] = sql("SELECT status, last_error FROM outbox_messages")
    assert row.status == "dead" and "gave up after 3 attempts" in row.last_error


def test_a_result_after_the_lease_was_lost_does_not_overwrite_the_new_holders(app, sql):
    add(app)
    slow = delivery(app, lambda m: {"by": "slow"})
    fast = delivery(app, lambda m: {"by": "fast"})
    [message] = slow.store.take("slow:1", 1)
    start = Start(message.id, f"slow:1/{message.id}", 60.0)
    _, attempts = slow.store.step("slow:1", [], start)
    make_due(sql)  # the slow worker's lease expired: another worker takes the message
    fast.step(idle_worker(fast))
    outcome = slow.send_one(slow.senders["email"], message, attempts, start.token)
    kept, _ = slow.store.step("slow:1", [outcome.record], None)
    assert kept == set()  # logged as lease_lost
    [row] = sql("SELECT status, result, attempts FROM outbox_messages")
    assert (row.status, row.result, row.attempts) == ("sent", {"by": "fast"}, 2)


def test_taken_messages_are_charged_only_when_their_own_send_starts(app, sql):
    # A worker that dies with a batch in hand charges nothing to the messages it had not
    # started, and they are due again after a short hold, not a whole lease.
    add(app, count=3)
    work = delivery(app, print)
    taken = work.store.take("gone:1", 10)
    work.store.step("gone:1", [], Start(taken[0].id, f"gone:1/{taken[0].id}", 60.0))
    rows = sql(
        "SELECT attempts, leased_by, next_attempt_at - now() < interval '3 seconds' AS soon "
        "FROM outbox_messages ORDER BY id"
    )
    assert [(r.attempts, r.leased_by, r.soon) for r in rows] == [
        (1, f"gone:1/{taken[0].id}", False),  # its send started: charged, its lease
        (0, "gone:1", True),
        (0, "gone:1", True),
    ]


def test_a_step_sent_again_after_a_lost_connection_charges_and_records_once(app, sql):
    add(app, count=2)
    work = delivery(app, print)
    first, second = work.store.take("w:1", 10)
    start = Start(first.id, f"w:1/{first.id}", 60.0)
    assert work.store.step("w:1", [], start) == (set(), 1)
    assert work.store.step("w:1", [], start, again=True) == (set(), 1)  # charged once
    outcome = work.send_one(work.senders["email"], first, 1, start.token)
    following = Start(second.id, f"w:1/{second.id}", 60.0)
    assert work.store.step("w:1", [outcome.record], following) == ({first.id}, 1)
    # The reply was lost: the same step again finds the record stored, the start made.
    again = work.store.step("w:1", [outcome.record], following, again=True)
    assert again == ({first.id}, 1)
    rows = sql("SELECT status, attempts FROM outbox_messages ORDER BY id")
    assert [(r.status, r.attempts) for r in rows] == [("sent", 1), ("pending", 1)]


def test_a_stopping_worker_gives_back_what_it_took_and_did_not_start(app, sql):
    add(app, count=3)
    sent = []
    work = delivery(app, None)
    worker = idle_worker(work)

    def send(message):
        sent.append(message.id)
        worker.stop()  # SIGTERM arrives during the first send

    work.senders["email"] = Sender("email", send)
    work.step(worker)
    assert len(sent) == 1
    rows = sql(
        "SELECT id, status, attempts, leased_by, next_attempt_at <= now() AS due "
        "FROM outbox_messages ORDER BY id"
    )
    assert [(r.status, r.attempts, r.leased_by) for r in rows] == [
        ("sent", 1, None),
        ("pending", 0, None),
        ("pending", 0, None),
    ]
    assert rows[1].due and rows[2].due  # any worker may take them at once


def test_batches_respect_the_configured_size_and_skip_locked_rows(app, sql):
    add(app, count=5)
    first = Delivery(app.extensions["idemhook.db"], {"email": Sender("email", print)}, batch=2)
    second = Delivery(app.extensions["idemhook.db"], {"email": Sender("email", print)}, batch=10)
    taken = first.store.take("first:1", first.batch)
    rest = second.store.take("second:1", second.batch)
    assert len(taken) == 2 and len(rest) == 3
    assert not {m.id for m in taken} & {m.id for m in rest}


@pytest.mark.parametrize("attempt", [1, 2, 5, 20, 200])
def test_backoff_doubles_from_the_base_up_to_the_cap_with_jitter(attempt):
    rng = random.Random(attempt)
    step = min(60.0, 0.5 * 2 ** (attempt - 1))
    waits = [backoff(attempt, 0.5, 60.0, rng) for _ in range(200)]
    assert all(step / 2 <= w <= step for w in waits)
    assert max(waits) - min(waits) > step / 10  # jittered, not one value


# -- the sources file's [outbox.<kind>] --------------------------------------------------------


def test_the_sources_file_sets_a_senders_retry_policy(make_app):
    app = make_app({**MAIL_SOURCES, "outbox": {"email": {"max_attempts": 2, "lease_seconds": 5}}})
    email = app.extensions["idemhook.registry"].senders["email"]
    assert (email.max_attempts, email.lease_seconds, email.backoff_seconds) == (2, 5.0, 5.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"emial": {"max_attempts": 2}}, r"\[outbox.emial\]: no @sender .* \(senders: email\)"),
        ({"email": {"max_attempt": 2}}, r"\[outbox.email\]: unknown key\(s\) max_attempt"),
        ({"email": {"lease_seconds": 0}}, r"\[outbox.email\]: .*lease_seconds"),
        ({"email": {"max_attempts": "3"}}, r"\[outbox.email\]: .*max_attempts"),
    ],
)
def test_a_bad_outbox_table_stops_start_up_naming_it(pg_url, table, message):
    with pytest.raises(ConfigError, match=message):
        create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": {**MAIL_SOURCES, "outbox": table}})


def test_two_senders_for_one_kind_stop_start_up(pg_url):
    config = {**MAIL_SOURCES, "plugins": [*MAIL_SOURCES["plugins"], "tests.plugins.second_mailer"]}
    with pytest.raises(ConfigError, match="one sender per kind"):
        create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": config})


# -- SQLite (the demo) -------------------------------------------------------------------------


@pytest.mark.sqlite
def test_the_outbox_works_on_sqlite_too(sqlite_url):
    app = create_app({"DATABASE_URL": sqlite_url, "IDEMHOOK_CONFIG": MAIL_SOURCES})
    engine = app.extensions["idemhook.db"].engine
    try:
        client = app.test_client()
        assert deliver(client, "mail", {"id": "s1"}).status_code == 200
        assert deliver(client, "mail", {"id": "s1"}).json["status"] == "duplicate"
        failures = iter([OSError("down"), None])

        def send(message):
            error = next(failures)
            if error:
                raise error
            return {"ok": message.key}

        work = delivery(app, send)
        work.step(idle_worker(work))
        with engine.begin() as conn:
            conn.execute(text("UPDATE outbox_messages SET next_attempt_at = '2000-01-01'"))
        work.step(idle_worker(work))
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT key, status, attempts, result, last_error FROM outbox_messages")
            ).all()
        assert [(r.key, r.status, r.attempts) for r in rows] == [("mail:s1:0", "sent", 2)]
        assert "OSError: down" in rows[0].last_error
        metrics = client.get("/metrics").get_data(as_text=True)
        assert 'idemhook_outbox_messages{status="pending"} 0.0' in metrics
    finally:
        with engine.begin() as conn:
            for table in ("outbox_messages", "processed_events", "test_effects"):
                conn.execute(text(f"DELETE FROM {table}"))
        engine.dispose()


def test_handlers_list_names_each_kinds_sender_and_policy(make_app):
    app = make_app({**MAIL_SOURCES, "outbox": {"email": {"max_attempts": 4}}})
    output = app.test_cli_runner().invoke(args=["handlers", "list"]).output
    assert (
        "outbox sender: email  examples.email_api.sender:send_email  (max_attempts 4, "
        "lease 60 s, backoff 5-3600 s)"
    ) in output


def test_a_sender_that_cannot_take_a_message_stops_start_up_naming_it(pg_url):
    config = {**MAIL_SOURCES, "plugins": [*MAIL_SOURCES["plugins"], "tests.plugins.bad_sender"]}
    with pytest.raises(ConfigError, match=r"sender tests.plugins.bad_sender:send must accept"):
        create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": config})


def test_the_worker_refuses_to_start_without_a_sender(make_app):
    result = make_app().test_cli_runner().invoke(args=["worker"])
    assert result.exit_code == 2
    assert "no @sender is registered" in result.output


def test_the_listen_url_is_normalised_off_is_accepted_and_a_bad_one_refused(monkeypatch):
    from idemhook._config import settings

    monkeypatch.setenv("DATABASE_URL", "sqlite://")
    monkeypatch.setenv("IDEMHOOK_WORKER_LISTEN_URL", "postgres://u@db.example/app")
    assert settings.load()["IDEMHOOK_WORKER_LISTEN_URL"].drivername == "postgresql+psycopg2"
    monkeypatch.setenv("IDEMHOOK_WORKER_LISTEN_URL", "off")
    assert settings.load()["IDEMHOOK_WORKER_LISTEN_URL"] == "off"
    monkeypatch.setenv("IDEMHOOK_WORKER_LISTEN_URL", "mysql://root:hunter2@db/app")
    with pytest.raises(ConfigError, match="IDEMHOOK_WORKER_LISTEN_URL") as info:
        settings.load()
    assert "hunter2" not in str(info.value)
