"""The email-send API example (examples/email_api): one email per Idempotency-Key, ever.

Through the test kit (the handler, its table, the field checks, ``GET /v1/emails/<id>``,
clients kept apart), then as deployed: a real gunicorn, a real ``idemhook worker`` and a
real SMTP server.
"""

from __future__ import annotations

import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from examples.email_api.handlers import PROBLEMS, TITLES, validate
from examples.email_api.sender import message_id
from idemhook._engine.sender import Delivery
from idemhook._engine.worker import Worker
from tests.mail import SmtpServer
from tests.reliability.conftest import wait_for
from tests.servers import gunicorn, worker
from tests.test_openapi_routes import conforms

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "email_api" / "webhooks.toml"
TOKEN = "email-api-test-token-0123456789"
EMAIL = {"to": "ada@example.com", "subject": "Welcome", "text": "Hello, Ada."}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Two named clients instead of the example's one (`secret`).
TOKENS = {"acme": "acme-email-token-0123456789", "globex": "globex-email-token-0123456789"}


@pytest.fixture
def emails(idemhook, monkeypatch):
    """The example's receiver on a fresh database with its emails table."""
    monkeypatch.setenv("EMAIL_API_TOKEN", TOKEN)
    return idemhook(EXAMPLE)


@pytest.fixture
def two_clients(idemhook):
    """The example with the clients acme and globex (``[sources.emails.clients]``)."""
    config = tomllib.loads(EXAMPLE.read_text())
    source = config["sources"]["emails"]
    del source["secret"]
    source["clients"] = dict(TOKENS)
    return idemhook(config)


def post(kit, body, key, **kwargs):
    return kit.deliver("emails", body, headers={"Idempotency-Key": key}, **kwargs)


def get(kit, email_id, headers=AUTH):
    return kit.client.get(f"/v1/emails/{email_id}", headers=headers)


def send_due(kit, smtp_port: int, monkeypatch) -> None:
    """One pass of the worker's outbox delivery, in this process, to ``smtp_port``."""
    monkeypatch.setenv("EMAIL_SMTP_PORT", str(smtp_port))
    registry = kit.app.extensions["idemhook.registry"]
    work = Delivery(kit.app.extensions["idemhook.db"], registry.senders)
    work.step(Worker([work], listen_url=None))


def test_an_email_is_queued_with_its_outbox_message_and_answered_202(emails):
    first = post(emails, EMAIL, "key-1")
    assert first.status_code == 202
    assert first.json == {"id": 1, "status": "queued"}
    assert first.headers["Location"] == "/v1/emails/1"
    assert "Idempotent-Replayed" not in first.headers
    conforms(first, "/v1/emails", "post")
    again = post(emails, EMAIL, "key-1")
    assert (again.status_code, again.get_data()) == (202, first.get_data())
    assert again.headers["Location"] == "/v1/emails/1"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert emails.sql("SELECT idempotency_key, client, recipient, outbox_id FROM emails") == [
        ("key-1", None, "ada@example.com", 1)
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
def test_an_invalid_email_is_a_400_problem_naming_the_field_and_nothing_is_queued(
    emails, body, field, problem
):
    assert problem in validate(body)[field]
    answer = post(emails, body, "key-bad")
    assert answer.status_code == 400
    assert answer.content_type == "application/problem+json"
    assert answer.json["error"] == "invalid_email" and answer.json["status"] == 400
    assert answer.json["type"] == "docs/outbox.md#invalid_email"
    assert problem in answer.json["errors"][field]
    assert f"{field}: " in answer.json["detail"] == answer.json["message"]
    conforms(answer, "/v1/emails", "post")
    # The operation's answer, like a 202: the retry hears the same, and still nothing is queued.
    again = post(emails, body, "key-bad")
    assert (again.status_code, again.json) == (400, answer.json)
    assert again.content_type == "application/problem+json"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert emails.sql("SELECT count(*) FROM emails") == [(0,)]
    assert emails.sql("SELECT count(*) FROM outbox_messages") == [(0,)]


def test_get_shows_the_email_queued_then_sent_with_the_smtp_answer(emails, monkeypatch):
    post(emails, EMAIL, "key-2")
    queued = get(emails, 1)
    assert queued.status_code == 200
    assert queued.json["status"] == "queued" and queued.json["sent_at"] is None
    assert queued.json["smtp"] is None
    assert (queued.json["to"], queued.json["subject"]) == ("ada@example.com", "Welcome")
    conforms(queued, "/v1/emails/{id}")
    with SmtpServer() as smtp:
        send_due(emails, smtp.port, monkeypatch)
        [received] = smtp.accepted
    sent = get(emails, 1)
    assert sent.status_code == 200
    assert sent.json["status"] == "sent" and sent.json["sent_at"] >= sent.json["created_at"]
    assert sent.json["smtp"] == "250 2.0.0 queued as " + received.message_id.strip("<>")[:16]
    assert sent.json["error"] is None
    conforms(sent, "/v1/emails/{id}")
    assert received.message_id == message_id("email:key-2")
    assert received.to == ("ada@example.com",) and received.text == "Hello, Ada."


def test_get_needs_the_clients_credentials_and_knows_only_its_emails(emails):
    post(emails, EMAIL, "key-3")
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        refused = get(emails, 1, headers)
        assert refused.status_code == 401
        assert refused.content_type == "application/problem+json"
        assert refused.json["error"] in ("missing_credentials", "invalid_credentials")
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="idemhook"'
        conforms(refused, "/v1/emails/{id}")
    for missing in ("2", "abc", "99999999999999999999"):
        unknown = get(emails, missing)
        assert unknown.status_code == 404
        assert unknown.content_type == "application/problem+json"
        assert unknown.json["error"] == "email_not_found"
        assert unknown.json["type"] == "docs/outbox.md#email_not_found"
        conforms(unknown, "/v1/emails/{id}")


def test_a_client_reads_only_its_own_emails(two_clients):
    acme = {"Authorization": f"Bearer {TOKENS['acme']}"}
    globex = {"Authorization": f"Bearer {TOKENS['globex']}"}
    mine = post(two_clients, EMAIL, "same-key", client="acme")
    # The same key from another client is another request: another email.
    theirs = post(two_clients, {**EMAIL, "to": "bob@example.com"}, "same-key", client="globex")
    assert (mine.status_code, mine.json) == (202, {"id": 1, "status": "queued"})
    assert (theirs.status_code, theirs.json) == (202, {"id": 2, "status": "queued"})
    assert get(two_clients, 1, acme).json["to"] == "ada@example.com"
    assert get(two_clients, 2, globex).json["to"] == "bob@example.com"
    for email_id, headers in ((1, globex), (2, acme)):
        hidden = get(two_clients, email_id, headers)
        assert hidden.status_code == 404  # as for an id that does not exist: nothing leaks
        assert hidden.json["error"] == "email_not_found"
        assert "ada@" not in hidden.get_data(as_text=True)
    assert two_clients.sql("SELECT id, client, idempotency_key FROM emails ORDER BY id") == [
        (1, "acme", "acme:same-key"),
        (2, "globex", "globex:same-key"),
    ]


def test_a_key_reused_after_its_ttl_names_the_same_email(emails):
    first = post(emails, EMAIL, "key-4")
    # key_ttl (24h) has passed: to idemhook the key is a new request, and the handler runs.
    emails.sql("UPDATE processed_events SET expires_at = now() - interval '1 second'")
    later = post(emails, EMAIL, "key-4")
    assert (later.status_code, later.json) == (202, first.json)
    assert "Idempotent-Replayed" not in later.headers
    assert emails.sql("SELECT count(*) FROM emails") == [(1,)]
    assert emails.sql("SELECT count(*) FROM outbox_messages") == [(1,)]


def send_with_retries(url: str, headers: dict[str, str]) -> tuple[requests.Response, list]:
    """POST as docs/idempotency-keys.md's client retry loop does; (the answer, the 409s)."""
    in_use = []
    for _attempt in range(30):
        answer = requests.post(url, json=EMAIL, headers=headers, timeout=60)
        if answer.status_code != 409:
            return answer, in_use
        in_use.append(answer)
        # The documented client waits Retry-After (1 s): the first request's answer is
        # stored by then. A client's pause, not the test's synchronisation.
        time.sleep(float(answer.headers["Retry-After"]))
    raise AssertionError("the key stayed in use")


@pytest.mark.gunicorn
@pytest.mark.fault
def test_50_requests_with_one_key_20_of_them_concurrent_send_exactly_one_email(emails):
    # The shipped example's own sources file, on the kit's database (with its emails table).
    sources = tomllib.loads(EXAMPLE.read_text())
    headers = {**AUTH, "Idempotency-Key": "one-key"}
    with SmtpServer() as smtp:
        env = {
            "EMAIL_API_TOKEN": TOKEN,
            "EMAIL_SMTP_PORT": str(smtp.port),
            "IDEMHOOK_WORKER_POLL_MS": "200",
        }
        with gunicorn(sources, emails.url, env=env) as server, worker(sources, emails.url, env=env):
            url = f"{server.url}/v1/emails"
            start = threading.Barrier(20)

            def send(_n: int) -> tuple[requests.Response, list]:
                start.wait(timeout=30)
                return send_with_retries(url, headers)

            with ThreadPoolExecutor(20) as pool:
                sent = list(pool.map(send, range(20)))
            sent += [send_with_retries(url, headers) for _ in range(30)]
            wait_for(lambda: smtp.accepted, "the email")
            wait_for(
                lambda: emails.sql(
                    "SELECT count(*) FROM outbox_messages WHERE status = 'pending'"
                ) == [(0,)],
                "the outbox to be drained",
            )
            shown = requests.get(f"{server.url}/v1/emails/1", headers=AUTH, timeout=10)
    answers = [answer for answer, _in_use in sent]
    assert len(answers) == 50
    # Every request's answer is the same 202 body; one ran the operation, 49 are replays.
    assert {(a.status_code, a.content) for a in answers} == {
        (202, b'{"id":1,"status":"queued"}\n')
    }
    assert {a.headers["Location"] for a in answers} == {"/v1/emails/1"}
    replayed = [a.headers.get("Idempotent-Replayed") for a in answers]
    assert replayed.count(None) == 1 and replayed.count("true") == 49
    # A request that arrived while the first ran heard 409 at once (issue 12's contract)
    # and, retrying as documented, got the same 202.
    for refused in (r for _answer, in_use in sent for r in in_use):
        assert refused.json()["error"] == "idempotency_key_in_use"
        assert refused.headers["Retry-After"] == "1"
    # Exactly one email reached the SMTP server, and the API shows it sent.
    assert [r.message_id for r in smtp.arrived] == [message_id("email:one-key")]
    assert emails.sql("SELECT count(*) FROM emails") == [(1,)]
    assert emails.sql("SELECT status FROM outbox_messages") == [("sent",)]
    assert shown.status_code == 200 and shown.json()["status"] == "sent"
    assert shown.json()["smtp"].startswith("250 ")


def test_the_examples_problem_types_link_to_their_entries_in_the_docs():
    root = Path(__file__).resolve().parents[2]
    docs = (root / PROBLEMS).read_text()
    assert set(TITLES) == {"invalid_email", "email_not_found"}
    for code in TITLES:  # each problem's type is f"{PROBLEMS}#{code}"
        assert f'<a id="{code}"></a>' in docs
