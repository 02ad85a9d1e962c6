"""Real ``idemhook worker`` processes, a real gunicorn and a real SMTP server (aiosmtpd).

The emails are sent by the shipped example sender (``examples.email_api.sender``,
smtplib, a Message-ID derived from the outbox key); the messages are added by a
handler of the real claim path (``tests.plugins.mailer``) or, for the 2,000, in
one transaction as a burst of committed claims would leave them.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import create_engine, text

from idemhook._engine.outbox import add_message
from tests.mail import SmtpServer
from tests.reliability.conftest import signed_post, wait_for
from tests.servers import gunicorn, worker
from tests.test_outbox import MAIL_SOURCES

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]


def mail_env(smtp: SmtpServer, **settings: str) -> dict[str, str]:
    """The example sender's settings, and a quicker poll than the default second."""
    return {
        "EMAIL_SMTP_HOST": "127.0.0.1",
        "EMAIL_SMTP_PORT": str(smtp.port),
        "EMAIL_SMTP_TIMEOUT": "30",
        "IDEMHOOK_WORKER_POLL_MS": "200",
        **settings,
    }


def with_policy(**policy) -> dict:
    return {**MAIL_SOURCES, "outbox": {"email": policy}}


def status_of(sql, message_id: int):
    return sql(
        "SELECT status, attempts, last_error, result FROM outbox_messages WHERE id = :id",
        id=message_id,
    )[0]


def test_a_handler_that_raises_after_adding_sends_nothing_and_its_retry_sends_one(clean_db, sql):
    with (
        SmtpServer() as smtp,
        gunicorn(MAIL_SOURCES, clean_db) as server,
        worker(MAIL_SOURCES, clean_db, env=mail_env(smtp)) as running,
    ):
        sql("INSERT INTO test_failures (event_id, reason) VALUES ('r1', 'crm down')")
        failed = signed_post(server.url, "mail", {"id": "r1", "to": "ada@example.com"})
        assert failed.status_code == 500
        assert sql("SELECT count(*) FROM outbox_messages") == [(0,)]

        sql("DELETE FROM test_failures")
        retried = signed_post(server.url, "mail", {"id": "r1", "to": "ada@example.com"})
        assert retried.status_code == 200
        message_id = retried.json()["result"]["queued"]
        wait_for(lambda: status_of(sql, message_id).status == "sent", "the email to be sent")
        [email] = smtp.wait_for(1)
        assert email.to == ("ada@example.com",) and email.subject == "event r1"
        row = status_of(sql, message_id)
        assert row.result["message_id"] == email.message_id
        assert row.result["smtp"].startswith("250 ")
        wait_for(lambda: "outcome=sent" in running.log(), "the worker's sent line")
    assert len(smtp.accepted) == 1  # the failed delivery's message never existed


def test_a_worker_killed_while_the_smtp_server_holds_data_is_replaced_after_its_lease(
    clean_db, sql
):
    sources = with_policy(lease_seconds=2)
    with SmtpServer() as smtp, gunicorn(sources, clean_db) as server:
        gate = smtp.hold()
        with worker(sources, clean_db, env=mail_env(smtp)) as first:
            answer = signed_post(server.url, "mail", {"id": "k1", "to": "ada@example.com"})
            message_id = answer.json()["result"]["queued"]
            assert gate.arrived.wait(30), first.log()  # the email is in; no 250 yet
            first.kill()
        [held] = smtp.arrived
        assert status_of(sql, message_id).status == "pending"  # nobody recorded a send
        smtp.release()  # the server now answers the dead worker's session (too late)
        with worker(sources, clean_db, env=mail_env(smtp)) as second:
            wait_for(lambda: status_of(sql, message_id).status == "sent", "the resend")
            # The line is written after the commit: wait for it, not for a guess.
            wait_for(lambda: "outcome=sent" in second.log(), "the second worker's sent line")
        row = status_of(sql, message_id)
    assert row.attempts == 2  # the killed worker's attempt, and the one that was recorded
    ids = smtp.message_ids(accepted=False)
    assert len(ids) == 2  # the held email and one duplicate, no more ...
    assert set(ids) == {held.message_id}  # ... and it is recognisably the same email
    assert row.result["message_id"] == held.message_id


def test_with_the_smtp_server_down_attempts_back_off_then_dead_then_retry_sends_it(
    clean_db, sql, pg_url
):
    sources = with_policy(max_attempts=3, backoff_seconds=0.4, max_backoff_seconds=2)
    smtp = SmtpServer()  # not started: the port refuses connections
    with gunicorn(sources, clean_db) as server, worker(sources, clean_db, env=mail_env(smtp)) as w:
        answer = signed_post(server.url, "mail", {"id": "d1"})
        message_id = answer.json()["result"]["queued"]
        wait_for(lambda: status_of(sql, message_id).status == "dead", "the message to go dead")
        row = status_of(sql, message_id)
        assert row.attempts == 3
        assert "ConnectionRefusedError" in row.last_error
        [(spread,)] = sql(
            "SELECT EXTRACT(EPOCH FROM last_attempt_at - created_at) FROM outbox_messages"
        )
        assert spread >= 0.2 + 0.4  # two backoffs, each at least half its step (0.4 s, 0.8 s)
        lines = re.findall(r"attempt=(\d) outcome=(\w+)", w.log())
        assert lines == [("1", "retry"), ("2", "retry"), ("3", "dead")]

        smtp.start()
        try:
            runner = create_app_runner(pg_url)
            result = runner.invoke(args=["outbox", "retry", str(message_id)])
            assert result.exit_code == 0, result.output
            assert f"message {message_id}: retrying (was dead; due now)" in result.output
            wait_for(lambda: status_of(sql, message_id).status == "sent", "the retried send")
            assert len(smtp.wait_for(1)) == 1
        finally:
            smtp.stop()


def test_three_workers_send_each_of_2000_pending_messages_exactly_once(clean_db, sql):
    engine = create_engine(clean_db)
    with engine.begin() as conn:
        for n in range(2000):
            add_message(
                conn,
                "email",
                {"to": f"user{n}@example.com", "subject": f"n{n}", "text": "hi"},
                f"bulk-{n}",
            )
    engine.dispose()
    with SmtpServer() as smtp, worker(MAIL_SOURCES, clean_db, count=3, env=mail_env(smtp)) as ws:
        wait_for(
            lambda: sql("SELECT count(*) FROM outbox_messages WHERE status = 'sent'")[0][0] == 2000,
            "all 2,000 messages to be sent",
            timeout=300,
        )
        logs = [w.log() for w in ws]
    ids = smtp.message_ids(accepted=False)
    assert len(ids) == 2000 and len(set(ids)) == 2000
    assert sorted(e.subject for e in smtp.accepted) == sorted(f"n{n}" for n in range(2000))
    assert sql("SELECT max(attempts) FROM outbox_messages") == [(1,)]
    sent_by = [log.count("outcome=sent") for log in logs]
    assert sum(sent_by) == 2000 and all(sent_by), sent_by  # all three shared the work


def create_app_runner(url):
    from idemhook import create_app

    app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": {}}, database_only=True)
    return app.test_cli_runner()


def test_sigterm_finishes_the_email_in_hand_and_gives_back_the_rest(clean_db, sql):
    engine = create_engine(clean_db)
    with engine.begin() as conn:
        ids = [
            add_message(conn, "email", {"to": "a@example.com", "subject": f"s{n}", "text": "x"},
                        f"term-{n}")
            for n in range(3)
        ]
    engine.dispose()
    with SmtpServer() as smtp:
        gate = smtp.hold()
        with worker(MAIL_SOURCES, clean_db, env=mail_env(smtp)) as running:
            assert gate.arrived.wait(30), running.log()  # the first email is in hand
            running.process.terminate()  # SIGTERM, as a deploy sends it
            smtp.release()
            assert running.process.wait(timeout=60) == 0, running.log()
            log = running.log()
        rows = sql("SELECT id, status, attempts, leased_by FROM outbox_messages ORDER BY id")
    assert [(r.id, r.status, r.attempts, r.leased_by) for r in rows] == [
        (ids[0], "sent", 1, None),  # finished and recorded before it exited
        (ids[1], "pending", 0, None),  # given back, as if never taken
        (ids[2], "pending", 0, None),
    ]
    assert len(smtp.accepted) == 1
    assert "outcome=sent" in log and log.rstrip().endswith("stopped")


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["clean stop", "crash"])
def test_the_worker_outlives_a_database_restart_and_sends_what_comes_after(own_cluster, mode):
    cluster, url = own_cluster
    engine = create_engine(url)

    def queue(key: str) -> int:
        with engine.begin() as conn:
            return add_message(conn, "email", {"to": "a@example.com", "subject": key,
                                               "text": "x"}, key)

    def status(message_id: int) -> str | None:
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT status FROM outbox_messages WHERE id = :id"), {"id": message_id}
            ).scalar()

    try:
        with SmtpServer() as smtp, worker(MAIL_SOURCES, url, env=mail_env(smtp)) as running:
            before = queue("before")
            wait_for(lambda: status(before) == "sent", "the first email")
            engine.dispose()
            cluster.stop(mode)
            wait_for(lambda: "unreachable" in running.log() or "LISTEN connection was lost"
                     in running.log(), "the worker to notice the database is gone")
            cluster.start()
            after = queue("after")
            wait_for(lambda: status(after) == "sent", "the email queued after the restart")
            assert running.process.poll() is None  # the same process, never restarted
            assert [r.subject for r in smtp.accepted] == ["before", "after"]
    finally:
        engine.dispose()
