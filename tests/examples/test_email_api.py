"""The email-send API example (examples/email_api): one email per Idempotency-Key, ever.

Through the test kit (the handler, its table, the field checks, the status view),
then as deployed: a real gunicorn, a real ``idemhook worker`` and a real SMTP server.
"""

from __future__ import annotations

import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from app.sending import Delivery
from app.worker import Worker
from examples.email_api.handlers import status, validate
from examples.email_api.sender import message_id
from tests.mail import SmtpServer
from tests.reliability.conftest import wait_for
from tests.servers import gunicorn, worker

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "email_api" / "webhooks.toml"
TOKEN = "email-api-test-token-0123456789"
EMAIL = {"to": "ada@example.com", "subject": "Welcome", "text": "Hello, Ada."}


@pytest.fixture
def emails(idemhook, monkeypatch):
    """The example's receiver on a fresh database with its emails table."""
    monkeypatch.setenv("EMAIL_API_TOKEN", TOKEN)
    return idemhook(EXAMPLE)


def post(kit, body, key):
    return kit.deliver("emails", body, headers={"Idempotency-Key": key})


def test_an_email_is_recorded_with_its_outbox_message_and_retries_answer_the_same(emails):
    first = post(emails, EMAIL, "key-1")
    assert first.status_code == 200
    assert first.json["result"] == {"id": 1, "status": "queued"}
    again = post(emails, EMAIL, "key-1")
    assert again.json["status"] == "duplicate" and again.json["result"] == first.json["result"]
    assert emails.sql("SELECT idempotency_key, recipient, outbox_id FROM emails") == [
        ("key-1", "ada@example.com", 1)
    ]
    assert emails.sql("SELECT id, kind, key, status FROM outbox_messages") == [
        (1, "email", "email:key-1", "pending")
    ]


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({**EMAIL, "to": "not-an-address"}, "to", "not an email address"),
        ({"subject": "s", "text": "t"}, "to", "required"),
        ({**EMAIL, "subject": "two\nlines"}, "subject", "one line"),
        ({**EMAIL, "text": ""}, "text", "required"),
        ({**EMAIL, "text": "x" * 100_001}, "text", "at most 100000 characters"),
    ],
)
def test_an_invalid_email_is_refused_naming_the_field_and_nothing_is_queued(
    emails, body, field, problem
):
    assert problem in validate(body)[field]
    answer = post(emails, body, "key-bad")
    assert answer.json["status"] == "rejected"
    assert f"{field}: " in answer.json["result"]["rejected"]
    assert emails.sql("SELECT count(*) FROM emails") == [(0,)]
    assert emails.sql("SELECT count(*) FROM outbox_messages") == [(0,)]


def test_the_status_goes_from_queued_to_sent_with_the_smtp_answer(emails, monkeypatch):
    post(emails, EMAIL, "key-2")
    database = emails.app.extensions["idemhook.db"]
    with database.session() as db:
        assert status(db, 1)["status"] == "queued"
    registry = emails.app.extensions["idemhook.registry"]
    with SmtpServer() as smtp:
        monkeypatch.setenv("EMAIL_SMTP_PORT", str(smtp.port))
        work = Delivery(database, registry.senders)
        work.step(Worker([work], listen_url=None))
        [received] = smtp.accepted
    with database.session() as db:
        shown = status(db, 1)
    assert shown["status"] == "sent" and shown["sent_at"]
    assert shown["smtp"].startswith("250 ")
    assert received.message_id == message_id("email:key-2")
    assert received.to == ("ada@example.com",) and received.text == "Hello, Ada."


@pytest.mark.gunicorn
@pytest.mark.fault
def test_50_requests_with_one_key_20_of_them_concurrent_send_exactly_one_email(emails):
    # The shipped example's own sources file, on the kit's database (with its emails table).
    sources = tomllib.loads(EXAMPLE.read_text())
    headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "one-key"}
    with SmtpServer() as smtp:
        env = {
            "EMAIL_API_TOKEN": TOKEN,
            "EMAIL_SMTP_PORT": str(smtp.port),
            "IDEMHOOK_WORKER_POLL_MS": "200",
        }
        with gunicorn(sources, emails.url, env=env) as server, worker(sources, emails.url, env=env):
            url = f"{server.url}/webhooks/emails"
            start = threading.Barrier(20)

            def send(_n: int) -> requests.Response:
                start.wait(timeout=30)
                return requests.post(url, json=EMAIL, headers=headers, timeout=60)

            with ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(send, range(20)))
            answers += [
                requests.post(url, json=EMAIL, headers=headers, timeout=60) for _ in range(30)
            ]
            wait_for(lambda: smtp.accepted, "the email")
            wait_for(
                lambda: emails.sql(
                    "SELECT count(*) FROM outbox_messages WHERE status = 'pending'"
                ) == [(0,)],
                "the outbox to be drained",
            )
    assert {a.status_code for a in answers} == {200}
    assert all(a.json()["result"] == {"id": 1, "status": "queued"} for a in answers)
    assert [a.json()["status"] for a in answers].count("processed") == 1
    assert [r.message_id for r in smtp.arrived] == [message_id("email:one-key")]
    assert emails.sql("SELECT count(*) FROM emails") == [(1,)]
