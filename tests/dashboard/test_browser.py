"""The dashboard in a real browser (headless Chromium) against a real gunicorn and PostgreSQL.

An operator's round: log in, find a delivered event, filter, open it, watch a
handler fail, fix it, retry, replay, log out. The screenshots it takes along the
way are docs/dashboard.md's: ``make screenshots`` runs this module with
``IDEMHOOK_SCREENSHOTS=docs/dashboard`` (otherwise they go to a temporary folder).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from idemhook import create_app
from idemhook._engine.outbox import add_message
from idemhook._engine.registry import Sender
from idemhook._engine.sender import Delivery
from idemhook._engine.worker import Worker
from idemhook.testing.kit import signed
from tests.browser import chromium_page
from tests.conftest import SOURCES
from tests.dashboard.conftest import TOKEN
from tests.servers import gunicorn

pytestmark = pytest.mark.gunicorn

#: The screenshots docs/dashboard.md shows, in its order.
SCREENSHOTS = (
    "login", "overview", "events", "event", "replay", "failures", "retried", "outbox", "refused"
)
PUBLIC_URL = "https://hooks.example.com"

#: A day of earlier traffic, so that the overview's chart and tables have something to show.
HISTORY = """
INSERT INTO processed_events (source, event_id, event_type, status, received_at,
    processed_at, payload, result, duplicate_count, last_seen_at)
SELECT src, 'hist_' || h || '_' || n, typ,
    CASE WHEN (h * n) % 97 = 1 THEN 'rejected' WHEN typ = 'invoice.paid' THEN 'ignored'
         ELSE 'processed' END,
    at, at, jsonb_build_object('id', 'hist_' || h || '_' || n, 'type', typ),
    jsonb_build_object('applied', 'hist_' || h || '_' || n),
    CASE WHEN n % 9 = 0 THEN 1 ELSE 0 END, at
FROM (
    SELECT h, n, (ARRAY['acme', 'acme', 'batched', 'open'])[(h * 7 + n) % 4 + 1] AS src,
        (ARRAY['contact.created', 'contact.updated', 'deal.won', 'invoice.paid'])[(h + n) % 4 + 1]
            AS typ,
        now() - interval '3 minutes' - h * interval '1 hour'
            - ((n * 37) % 3300) * interval '1 second' AS at
    FROM generate_series(0, 23) AS h, generate_series(1, (45 + 35 * sin(h / 3.8))::int) AS n
) AS history;
INSERT INTO delivery_failures (source, event_id, event_type, error, traceback, raw_body,
    payload, headers, permanent, failed_at)
SELECT source, event_id, event_type, 'tests.plugins.recorder:record raised TimeoutError',
    'Traceback (most recent call last): ...', '\\x7b7d', payload, '{}', false,
    received_at - interval '20 seconds'
FROM processed_events WHERE event_id LIKE 'hist_%' AND right(event_id, 2) = '25'
"""


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("IDEMHOOK_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(pg_url) -> Iterator:
    env = {"IDEMHOOK_ADMIN_TOKEN": TOKEN, "IDEMHOOK_PUBLIC_URL": PUBLIC_URL}
    with gunicorn(SOURCES, pg_url, env=env) as running:
        yield running


@pytest.fixture
def send(pg_url, server):
    """POST a signed delivery to the server, as the provider would."""
    signer = create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": SOURCES})

    def post(source: str, payload: dict) -> requests.Response:
        _, body, headers = signed(signer, source, payload)
        url = f"{server.url}/webhooks/{source}"
        return requests.post(url, data=body, headers=headers, timeout=30)

    yield post
    signer.extensions["idemhook.db"].engine.dispose()


@pytest.fixture
def page(make_app) -> Iterator:
    make_app()  # empties the tables after the test
    with chromium_page() as browser_page:
        problems: list[str] = []
        # A script that runs (an alert) or anything the CSP blocks shows up here.
        browser_page.on(
            "dialog", lambda dialog: (problems.append(dialog.message), dialog.dismiss())
        )
        browser_page.on(
            "console",
            lambda message: problems.append(message.text) if message.type == "error" else None,
        )
        yield browser_page
        assert problems == [], problems


def _shoot(page, folder: Path, name: str, *, full_page: bool = True) -> None:
    assert name in SCREENSHOTS
    page.screenshot(path=str(folder / f"{name}.png"), full_page=full_page)


def _login(page, server) -> None:
    page.goto(f"{server.url}/dashboard")
    assert "/dashboard/login" in page.url
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/dashboard")


def test_an_operators_round(page, server, send, sql, screenshots):
    sql(HISTORY)
    # -- log in
    response = page.goto(f"{server.url}/dashboard")
    assert response.status == 200 and page.url.startswith(f"{server.url}/dashboard/login")
    page.fill("#token", "not-the-admin-token-at-all")
    page.click("button[type=submit]:has-text('Log in')")
    assert "That is not the admin token" in page.inner_text("main")
    _shoot(page, screenshots, "login")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]:has-text('Log in')")
    page.wait_for_url(f"{server.url}/dashboard")
    assert page.inner_text("h1") == "Last 24 hours"

    # -- a delivered event is in the list
    delivered = {"id": "evt_1001", "type": "contact.created", "email": "ada@example.com"}
    assert send("acme", delivered).json()["status"] == "processed"
    assert send("acme", delivered).json()["status"] == "duplicate"
    assert send("acme", {"id": "evt_1002", "type": "invoice.paid"}).json()["status"] == "ignored"
    page.reload()
    acme = page.locator("table.sources tbody tr", has_text="acme").first
    assert f"{PUBLIC_URL}/webhooks/acme" in acme.inner_text()
    _shoot(page, screenshots, "overview")

    page.click("nav >> text=Events")
    rows = page.locator("table.events tbody tr")
    assert rows.first.locator("td").nth(2).inner_text() == "evt_1002"  # newest first
    assert page.locator("table.events a", has_text="evt_1001").count() == 1

    # -- filter by type and status
    page.fill("input[name=type]", "contact.created")
    page.select_option("select[name=status]", "processed")
    page.select_option("select[name=source]", "acme")
    page.click("form.filters button[type=submit]")
    assert "type=contact.created" in page.url and "status=processed" in page.url
    types = rows.locator("td:nth-child(4)").all_inner_texts()
    statuses = rows.locator("td:nth-child(5)").all_inner_texts()
    assert types and set(types) == {"contact.created"} and set(statuses) == {"processed"}
    assert page.locator("table.events a", has_text="evt_1002").count() == 0
    assert rows.first.locator("td").nth(2).inner_text() == "evt_1001"
    _shoot(page, screenshots, "events", full_page=False)

    # -- open it: its payload and its result
    page.click("table.events a:has-text('evt_1001')")
    assert page.inner_text("h1") == "evt_1001"
    payload = page.locator("details.payload pre").inner_text()
    assert '"email": "ada@example.com"' in payload
    assert page.locator("pre.result").inner_text() == '{\n  "applied": "evt_1001"\n}'
    facts = page.inner_text("dl.facts")
    assert "processed" in facts and re.search(r"Duplicates\s+1", facts)
    page.click("details.payload summary")  # collapsible: closes
    assert not page.locator("details.payload pre").is_visible()
    page.click("details.payload summary")
    _shoot(page, screenshots, "event")

    # -- a handler fails: the failure and its traceback
    sql("INSERT INTO test_failures VALUES ('evt_2001', 'the CRM answered 502 Bad Gateway')")
    failed = send("acme", {"id": "evt_2001", "type": "contact.updated", "email": "bob@example.com"})
    assert failed.status_code == 500
    page.click("nav >> text=Failures")
    failure = page.locator("article.failure", has_text="evt_2001")
    assert "RuntimeError" in failure.locator(".error").inner_text()
    failure.locator("details.traceback summary").click()
    traceback = failure.locator("details.traceback pre").inner_text()
    assert "Traceback (most recent call last)" in traceback
    assert "RuntimeError: the CRM answered 502 Bad Gateway" in traceback
    _shoot(page, screenshots, "failures")

    # -- fix the handler, click Retry: processed
    sql("DELETE FROM test_failures")
    failure.locator("button:has-text('Retry')").click()
    page.wait_for_load_state()
    assert "acme/evt_2001: processed" in page.inner_text(".flashes")
    assert page.locator("article.failure", has_text="evt_2001").count() == 0
    page.goto(f"{server.url}/dashboard/events/acme/evt_2001")
    assert "processed" in page.inner_text("dl.facts")
    assert "Failures (1)" in page.inner_text("main")
    _shoot(page, screenshots, "retried")
    assert sql("SELECT status FROM processed_events WHERE event_id = 'evt_2001'") == [
        ("processed",)
    ]

    # -- replay, after the confirmation step
    page.goto(f"{server.url}/dashboard/events/acme/evt_1001")
    page.click("text=Replay…")
    assert "their side effects happen a second time" in page.inner_text("main")
    _shoot(page, screenshots, "replay")
    page.click("button:has-text('Replay now')")
    assert "Replayed (replay #1)" in page.inner_text(".flashes")
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'evt_1001'") == [(2,)]

    # -- log out, and be refused
    page.click("button:has-text('Log out')")
    assert page.url.startswith(f"{server.url}/dashboard/login")
    assert "Logged out." in page.inner_text(".flashes")
    for path in ("/dashboard", "/dashboard/events/acme/evt_1001", "/dashboard/failures"):
        page.goto(f"{server.url}{path}")
        assert page.url.startswith(f"{server.url}/dashboard/login"), path
        assert "ada@example.com" not in page.content()


def _smtp(message):
    return {"smtp": f"250 2.0.0 Ok: queued as {message.id:06X}"}


def _crm(message):
    if message.payload["email"].startswith("gone"):
        raise ConnectionError("POST https://crm.example.com/v3/contacts: 503 Service Unavailable")
    return {"crm_id": 8000 + message.id}


def test_the_outbox_a_dead_message_retried(page, server, send, sql, screenshots, pg_url):
    # Events whose handlers queued an email and a CRM call (app.outbox's insert, with the
    # event's source and ID, as event.outbox.add does), then one round of the worker's
    # delivery loop: the CRM call for evt_3002 fails on its only attempt and goes dead.
    app = create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": SOURCES})
    database = app.extensions["idemhook.db"]
    try:
        for n in range(1, 5):
            event_id = f"evt_300{n}"
            email = ("gone" if n == 2 else "user") + f"{n}@example.com"
            send("acme", {"id": event_id, "type": "contact.created", "email": email})
            with database.engine.begin() as conn:
                for position, (kind, payload) in enumerate(
                    (("email", {"to": email, "subject": "Welcome"}), ("crm", {"email": email}))
                ):
                    key = f"acme:{event_id}:{position}"
                    add_message(conn, kind, payload, key, source="acme", event_id=event_id)
            if n == 3:
                senders = {
                    "email": Sender("email", _smtp),
                    "crm": Sender("crm", _crm, max_attempts=1),
                }
                work = Delivery(database, senders)
                work.step(Worker([work], listen_url=None))
    finally:
        database.engine.dispose()
    _login(page, server)
    page.click("nav >> text=Outbox")
    assert page.inner_text("h1") == "Outbox"
    dead = page.locator("table.outbox tbody tr", has_text="dead")
    assert dead.count() == 1
    assert "503 Service Unavailable" in dead.locator("pre.error").inner_text()
    assert "acme/evt_3002" in dead.inner_text()
    assert page.locator("table.outbox tbody tr", has_text="pending").count() == 2  # evt_3004
    _shoot(page, screenshots, "outbox")

    dead.locator("button:has-text('Retry')").click()
    page.wait_for_load_state()
    assert "Due now, with a fresh set of attempts" in page.inner_text(".flashes")
    assert page.locator("table.outbox tbody tr", has_text="dead").count() == 0
    assert sql(
        "SELECT status, attempts FROM outbox_messages WHERE key = 'acme:evt_3002:1'"
    ) == [("pending", 0)]


def test_refused_deliveries_and_a_paused_source(page, server, send, pg_url, screenshots):
    # A HubSpot-style mistake in miniature: a sender with the wrong secret, a forged
    # flood from a scanner, one body that is not JSON; then the operator pauses acme.
    forged = {"Content-Type": "application/json", "X-Signature": "sha256=" + "0" * 64}
    for n in range(6):
        agent = "Acme-Webhooks/2.1" if n % 2 else "python-requests/2.32 (scanner)"
        answer = requests.post(
            f"{server.url}/webhooks/acme",
            data=b'{"id": "evt_9", "type": "contact.updated"}',
            headers={**forged, "User-Agent": agent},
            timeout=30,
        )
        assert answer.status_code == 401
    answer = requests.post(
        f"{server.url}/webhooks/batched", data=b"hello", headers={"Content-Type": "text/plain"},
        timeout=30,
    )  # fmt: skip
    assert answer.status_code == 415
    app = create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": SOURCES})
    try:
        paused = app.test_cli_runner().invoke(
            args=["sources", "pause", "acme", "--by", "oncall", "--reason", "CRM maintenance"]
        )
        assert paused.exit_code == 0, paused.output
    finally:
        app.extensions["idemhook.db"].engine.dispose()
    _login(page, server)
    assert "Refused deliveries 7" in " ".join(page.inner_text("section.waiting").split())
    page.click("nav >> text=Refused")
    assert page.inner_text("h1") == "Refused deliveries"
    counts = page.locator("table.refused-counts tbody tr", has_text="acme").inner_text()
    assert counts.split() == ["acme", "6", "0", "6"]
    assert page.locator("table.refused tbody tr").count() == 7
    assert "CRM maintenance" in page.inner_text("section.waiting")
    _shoot(page, screenshots, "refused")


def test_hostile_payloads_stay_text_in_the_browser(page, server, send):
    hostile = {
        "id": "evt_xss",
        "type": "contact.created",
        "name": "<script>alert('name')</script>",
        "title": '"><img src=x onerror=alert(1)>',
    }
    assert send("acme", hostile).status_code == 200
    _login(page, server)
    response = page.goto(f"{server.url}/dashboard/events/acme/evt_xss")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-frame-options"] == "DENY"
    shown = page.locator("details.payload pre").inner_text()
    assert "<script>alert('name')</script>" in shown
    assert '"><img src=x onerror=alert(1)>' in shown
    assert page.locator("main img").count() == 0
    assert page.locator("main script").count() == 0
    page.goto(f"{server.url}/dashboard/events")
    assert page.locator("main img").count() == 0
    # The page fixture asserts that no dialog opened and that no CSP violation was logged.


def test_the_screenshots_in_the_docs_are_the_ones_this_module_takes():
    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "dashboard.md").read_text()
    shown = re.findall(r"\]\(dashboard/([a-z-]+)\.png\)", text)
    assert shown == list(SCREENSHOTS)
    for name in SCREENSHOTS:
        assert (docs / "dashboard" / f"{name}.png").stat().st_size > 10_000, name
