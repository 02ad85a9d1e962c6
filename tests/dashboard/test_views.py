"""The dashboard's pages and actions (Flask's test client on the real PostgreSQL)."""

from __future__ import annotations

import re
import select
import time
from datetime import UTC, datetime, timedelta
from html import unescape

import psycopg2
import pytest

from idemhook._engine.outbox import add_message
from idemhook._engine.registry import Sender
from idemhook._engine.sender import Delivery
from idemhook._engine.worker import Worker
from idemhook._store.notify import OUTBOX_CHANNEL as CHANNEL
from idemhook._web.dashboard import outbox, overview, views
from idemhook.testing import deliver
from tests.dashboard.conftest import HTML, TOKEN, Browser
from tests.test_events_cli import seed
from tests.test_outbox import MAIL_SOURCES


def text_of(html: str) -> str:
    """What a person reads: tags dropped, entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html))).strip()


def _row(page: str, first_cell: str) -> str:
    """The text of the table row whose first cell starts with ``first_cell``."""
    for row in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S)
        if cells and text_of(cells[0]).startswith(first_cell):
            return " | ".join(text_of(c) for c in cells)
    raise AssertionError(f"no row {first_cell!r}")


def _fail(sql, event_id: str, reason: str = "handler is broken") -> None:
    sql("INSERT INTO test_failures VALUES (:e, :r)", e=event_id, r=reason)


def _fix(sql) -> None:
    sql("DELETE FROM test_failures")


# -- overview --------------------------------------------------------------------------------


def test_overview_counts_the_last_24_hours_per_source(browser, sql):
    for n in range(3):
        deliver(browser.client, "acme", {"id": f"a{n}", "type": "contact.created"})
    deliver(browser.client, "acme", {"id": "a0", "type": "contact.created"})  # duplicates
    deliver(browser.client, "acme", {"id": "a0", "type": "contact.created"})
    deliver(browser.client, "acme", {"id": "inv", "type": "invoice.paid"})  # no handler: ignored
    _fail(sql, "a9")
    deliver(browser.client, "acme", {"id": "a9", "type": "contact.created"})
    seed(sql, "acme", "rej", ago=timedelta(minutes=5), status="rejected")
    seed(sql, "acme", "old", ago=timedelta(days=2))  # outside the window
    seed(sql, "gone", "g1", ago=timedelta(hours=3))  # a source no longer configured
    page = browser.get("/dashboard").text
    # events: a0 a1 a2 inv rej; duplicates 2 of 7 deliveries; none stale
    # (The last figure is Pending: events of asynchronous sources waiting for the worker.)
    assert _row(page, "acme") == (
        "acme | 5 | 2 | 28.6% | 1 | 1 | 0 | 1 | 0 | "
        "http://localhost/webhooks/acme (as this page was reached)"
    )
    assert _row(page, "open").startswith("open | 0 | 0 | - | 0 | 0 | 0 | 0 | 0 |")
    assert _row(page, "gone").startswith("gone (not configured) | 1 | 0 | 0.0%")
    assert _row(page, "All sources").startswith("All sources | 6 | 2 |")
    # The chart draws one bar of events and one of duplicates per hour.
    assert page.count('<rect class="events"') == 24
    assert page.count('<rect class="duplicates"') == 24
    assert "UTC: 5 events" in page or "UTC: 4 events" in page  # this hour (seed may straddle)
    assert "Unresolved failures" in text_of(page)
    assert "≈" not in page  # everything counted exactly


def test_overview_shows_the_public_url_when_one_is_set(make_app):
    app = make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN, IDEMHOOK_PUBLIC_URL="https://hooks.example.com")
    b = Browser(app.test_client())
    b.login()
    page = b.get("/dashboard").text
    assert "https://hooks.example.com/webhooks/acme" in page
    assert "as this page was reached" not in page


def test_busy_hours_are_estimated_and_say_so(browser, sql, monkeypatch):
    monkeypatch.setattr(overview, "SAMPLE", 4)
    for n in range(12):
        deliver(browser.client, "acme", {"id": f"b{n}", "type": "contact.created"})
    sql("ANALYZE processed_events")
    page = browser.get("/dashboard").text
    assert "Figures marked ≈ are estimates" in page
    assert 'class="events estimated"' in page
    assert "≈" in _row(page, "acme").split(" | ")[1]


def test_unresolved_failures_on_the_overview(browser, sql):
    _fail(sql, "f1")
    deliver(browser.client, "acme", {"id": "f1", "type": "contact.created"})
    deliver(browser.client, "acme", {"id": "f1", "type": "contact.created"})
    page = text_of(browser.get("/dashboard").text)
    assert "Unresolved failures 2" in page  # two failed attempts, neither resolved yet


def test_overview_leaves_out_queues_that_do_not_exist(browser):
    page = browser.get("/dashboard").text
    assert "waiting to be processed" not in page  # nothing waits for the worker
    assert "Outbox pending 0 Outbox dead 0" in text_of(page)  # the outbox is always there


def test_overview_shows_what_waits_for_the_worker_per_asynchronous_source(make_app, sql):
    from tests.test_accept import ASYNC_SOURCES

    app = make_app(ASYNC_SOURCES, IDEMHOOK_ADMIN_TOKEN=TOKEN)
    b = Browser(app.test_client())
    b.login()
    deliver(b.client, "queued", {"id": "w1", "type": "t"})
    deliver(b.client, "queued", {"id": "w2", "type": "t"})
    assert overview.async_queues()
    page = b.get("/dashboard").text
    assert "queued: waiting to be processed 2" in text_of(page)
    assert _row(page, "queued").startswith("queued | 2 | 0 | 0.0% | 0 | 0 | 0 | 0 | 2 (oldest")


def test_overview_counts_stale_events_and_the_event_page_names_the_newer_one(make_app):
    from tests.test_freshness import FRESH_SOURCES, event

    app = make_app(FRESH_SOURCES, IDEMHOOK_ADMIN_TOKEN=TOKEN)
    b = Browser(app.test_client())
    b.login()
    deliver(b.client, "versioned", event("v2", 2))
    deliver(b.client, "versioned", event("v1", 1))
    deliver(b.client, "versioned", event("v0", 0))
    page = b.get("/dashboard").text
    # Source | Events | Duplicates | Rate | Ignored | Rejected | Stale | Failed attempts
    assert _row(page, "versioned").startswith("versioned | 3 | 0 | 0.0% | 0 | 0 | 2 | 0 |")
    assert 'href="/dashboard/events?source=versioned&amp;status=stale"' in page
    event_page = b.get("/dashboard/events/versioned/v1").text
    assert "Status stale · newer: v2" in text_of(event_page)
    assert 'href="/dashboard/events/versioned/v2"' in event_page
    # Replaying it warns that it would overwrite newer data, and does when asked.
    confirm = text_of(b.get("/dashboard/replay/versioned/v1").text)
    assert "its object c1 holds event v2 (version 2, newer than this event's 1)" in confirm
    done = b.post("/dashboard/replay/versioned/v1")
    assert done.status_code == 303
    shown = text_of(b.get("/dashboard/events/versioned/v1").text)
    assert "Replayed (replay #1)" in shown and "Status processed" in shown


# -- events ----------------------------------------------------------------------------------


def test_events_list_filters_by_source_type_status_and_time(browser, sql):
    seed(sql, "acme", "old", ago=timedelta(days=3))
    seed(sql, "acme", "recent", ago=timedelta(minutes=30))
    seed(sql, "acme", "inv", ago=timedelta(minutes=20), type="invoice.paid", status="ignored")
    seed(sql, "open", "other", ago=timedelta(minutes=10), type=None)

    def ids(**query) -> list[str]:
        page = browser.get("/dashboard/events", query_string=query)
        assert page.status_code == 200
        return re.findall(r'href="/dashboard/events/[^/"]+/([^"]+)"', page.text)

    assert ids() == ["other", "inv", "recent", "old"]  # newest first
    assert ids(source="acme") == ["inv", "recent", "old"]
    assert ids(type="invoice.paid") == ["inv"]
    assert ids(status="ignored") == ["inv"]
    assert ids(status="processed", type="contact.updated") == ["recent", "old"]
    assert ids(since="2h") == ["other", "inv", "recent"]
    assert ids(until="1h") == ["old"]
    iso = (datetime.now(UTC) - timedelta(minutes=25)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids(since=iso, source="acme") == ["inv"]


def test_events_pages_follow_the_read_apis_cursor(browser, sql, monkeypatch):
    monkeypatch.setattr(views, "PAGE", 2)
    for n in range(5):
        seed(sql, "acme", f"p{n}", ago=timedelta(minutes=n))
    seen, url = [], "/dashboard/events?source=acme"
    while url:
        page = browser.get(unescape(url)).text
        seen += re.findall(r'href="/dashboard/events/acme/([^"]+)"', page)
        found = re.search(r'<a rel="next" href="([^"]+)"', page)
        url = found.group(1) if found else None
        if url:
            assert "cursor=" in url and "source=acme" in url
    assert seen == ["p0", "p1", "p2", "p3", "p4"]


def test_events_of_an_api_source_filter_and_show_by_client(browser, sql):
    # Idempotency-Key sources scope each key by its client (docs/idempotency-keys.md).
    seed(sql, "emails", "acme:k1", ago=timedelta(minutes=3))
    seed(sql, "emails", "globex:k1", ago=timedelta(minutes=2))
    sql("UPDATE processed_events SET client = split_part(event_id, ':', 1) WHERE source = 'emails'")
    page = browser.get("/dashboard/events", query_string={"client": "globex"})
    assert page.status_code == 200
    assert 'name="client" value="globex"' in page.text
    assert "globex:k1" in page.text and "acme:k1" not in page.text
    everyone = browser.get("/dashboard/events").text
    assert "globex:k1" in everyone and "acme:k1" in everyone


def test_a_bad_filter_is_explained_on_the_page(browser):
    page = browser.get("/dashboard/events", query_string={"since": "yesterday"})
    assert page.status_code == 200
    assert "is neither a duration" in unescape(page.text)
    page = browser.get("/dashboard/events", query_string={"cursor": "garbage"})
    assert "The cursor is not one this server handed out" in unescape(page.text)
    page = browser.get("/dashboard/events", query_string={"type": "a\x00b"})
    assert "NUL" in page.text


def test_search_by_exact_event_id(browser, sql):
    deliver(browser.client, "acme", {"id": "evt_42", "type": "contact.created"})
    deliver(browser.client, "open", {}, headers={"X-Event-Id": "shared"})
    seed(sql, "acme", "shared", ago=timedelta(minutes=1))
    _fail(sql, "never")
    deliver(browser.client, "acme", {"id": "never", "type": "contact.created"})

    found = browser.get("/dashboard/events", query_string={"id": "evt_42"})
    assert found.status_code == 303
    assert found.headers["Location"] == "/dashboard/events/acme/evt_42"
    both = browser.get("/dashboard/events", query_string={"id": "shared"}).text
    assert _row(both, "acme").startswith("acme | shared")
    assert _row(both, "open").startswith("open | shared")
    only = browser.get("/dashboard/events", query_string={"id": "shared", "source": "open"})
    assert only.headers["Location"] == "/dashboard/events/open/shared"
    failed = browser.get("/dashboard/events", query_string={"id": "never"})
    assert failed.headers["Location"] == "/dashboard/events/acme/never"
    none = browser.get("/dashboard/events", query_string={"id": "nope"}).text
    assert "No event with this ID is recorded" in text_of(none)


# -- one event -------------------------------------------------------------------------------


def test_event_page_shows_status_times_duplicates_result_and_payload(browser):
    payload = {"id": "evt_1", "type": "contact.created", "email": "ada@example.com"}
    deliver(browser.client, "acme", payload)
    deliver(browser.client, "acme", payload)
    page = browser.get("/dashboard/events/acme/evt_1").text
    facts = text_of(page)
    assert "Status processed" in facts
    assert "Duplicates 1" in facts
    assert re.search(r"Received \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", facts)
    assert "Last seen" in facts
    assert '<pre class="json result">{\n  &#34;applied&#34;: &#34;evt_1&#34;\n}</pre>' in page
    assert "<details class=\"payload\" open>" in page  # collapsible, open by default
    assert "&#34;email&#34;: &#34;ada@example.com&#34;" in page
    assert "Failures (0)" in facts
    assert 'href="/dashboard/replay/acme/evt_1"' in page


def test_event_ids_with_slashes_and_unknown_events(browser):
    deliver(browser.client, "open", {"a": 1}, headers={"X-Event-Id": "orders/7/paid"})
    page = browser.get("/dashboard/events/open/orders/7/paid")
    assert page.status_code == 200
    assert "orders/7/paid" in page.text
    missing = browser.get("/dashboard/events/acme/never")
    assert missing.status_code == 404
    assert missing.json["error"] == "event_not_found"


def test_event_page_lists_failures_with_tracebacks(browser, sql):
    _fail(sql, "evt_2", "the CRM answered 502")
    deliver(browser.client, "acme", {"id": "evt_2", "type": "contact.created"})
    page = browser.get("/dashboard/events/acme/evt_2").text
    facts = text_of(page)
    assert "Not applied: this event has failed 1 time(s)" in facts
    assert "Failures (1)" in facts
    assert "RuntimeError" in facts
    assert "Traceback (most recent call last)" in unescape(page)
    assert "the CRM answered 502" in unescape(page)
    assert "Payload (as last delivered)" in facts  # from the failure row
    assert "&#34;id&#34;: &#34;evt_2&#34;" in page


# -- replay ----------------------------------------------------------------------------------


def test_replay_asks_first_then_runs_the_handlers_again(browser, sql):
    deliver(browser.client, "acme", {"id": "evt_r", "type": "contact.created"})
    confirm = browser.get("/dashboard/replay/acme/evt_r")
    assert confirm.status_code == 200
    words = text_of(confirm.text)
    assert "their side effects happen a second time" in words
    assert "tests.plugins.recorder:record" in words
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'evt_r'")[0][0] == 1  # GET: none

    done = browser.post("/dashboard/replay/acme/evt_r")
    assert done.status_code == 303
    assert done.headers["Location"] == "/dashboard/events/acme/evt_r"
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'evt_r'")[0][0] == 2
    page = text_of(browser.get(done.headers["Location"]).text)
    assert "Replayed (replay #1)" in page
    assert "Replays 1 (last" in page


def test_a_failing_replay_changes_nothing_and_says_why(browser, sql):
    deliver(browser.client, "acme", {"id": "evt_rf", "type": "contact.created"})
    _fail(sql, "evt_rf", "still broken")
    done = browser.post("/dashboard/replay/acme/evt_rf")
    page = text_of(browser.get(done.headers["Location"]).text)
    assert "Not replayed: a handler raised RuntimeError: still broken" in page
    assert sql("SELECT replay_count FROM processed_events WHERE event_id = 'evt_rf'")[0][0] == 0
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'evt_rf'")[0][0] == 1


def test_replay_of_an_event_without_handlers_is_refused(browser):
    deliver(browser.client, "acme", {"id": "inv", "type": "invoice.paid"})
    confirm = text_of(browser.get("/dashboard/replay/acme/inv").text)
    assert "No handler matches source acme and type invoice.paid" in confirm
    done = browser.post("/dashboard/replay/acme/inv")
    page = text_of(browser.get(done.headers["Location"]).text)
    assert "Not replayed: no handler matches" in page


# -- failures --------------------------------------------------------------------------------


def test_failures_page_lists_unresolved_failures_with_tracebacks(browser, sql):
    _fail(sql, "f1", "first broken")
    _fail(sql, "f2", "second broken")
    deliver(browser.client, "acme", {"id": "f1", "type": "contact.created"})
    deliver(browser.client, "acme", {"id": "f2", "type": "contact.created"})
    _fix(sql)
    deliver(browser.client, "acme", {"id": "f2", "type": "contact.created"})  # resolves f2
    page = browser.get("/dashboard/failures").text
    words = unescape(page)
    assert "first broken" in words and "Traceback (most recent call last)" in words
    assert "second broken" not in words
    everything = unescape(browser.get("/dashboard/failures?all=1").text)
    assert "second broken" in everything and "resolved" in everything


def test_retry_one_failure_applies_the_event(browser, sql):
    _fail(sql, "f1")
    deliver(browser.client, "acme", {"id": "f1", "type": "contact.created"})
    _fix(sql)
    failure_id = sql("SELECT id FROM delivery_failures WHERE event_id = 'f1'")[0][0]
    done = browser.post(
        "/dashboard/failures/retry", {"only": str(failure_id), "back": "/dashboard/failures"}
    )
    assert done.status_code == 303 and done.headers["Location"] == "/dashboard/failures"
    page = text_of(browser.get("/dashboard/failures").text)
    assert "acme/f1: processed" in page
    assert "No unresolved failures" in page
    assert sql("SELECT status FROM processed_events WHERE event_id = 'f1'")[0][0] == "processed"


def test_retry_a_selection(browser, sql):
    for event_id in ("s1", "s2", "s3"):
        _fail(sql, event_id)
        deliver(browser.client, "acme", {"id": event_id, "type": "contact.created"})
    _fix(sql)
    _fail(sql, "s3", "s3 still broken")
    ids = dict(sql("SELECT event_id, id FROM delivery_failures"))
    done = browser.client.post(
        "/dashboard/failures/retry",
        data={"csrf_token": browser.csrf, "failure": [str(ids["s1"]), str(ids["s3"])]},
        headers=HTML,
    )
    page = text_of(browser.get(done.headers["Location"]).text)
    assert "acme/s1: processed" in page
    assert "acme/s3: failed" in page
    assert "acme/s2" not in page.split("Unresolved failures")[0]  # not selected, not retried
    applied = {row[0] for row in sql("SELECT event_id FROM processed_events")}
    assert applied == {"s1"}


def test_retry_with_nothing_selected_says_so(browser):
    for junk in ({}, {"failure": ["²", "9" * 5000]}):  # nothing that is a row ID either
        done = browser.post("/dashboard/failures/retry", junk)
        assert done.status_code == 303
        assert "Select at least one failure" in text_of(browser.get(done.headers["Location"]).text)


# -- outbox ----------------------------------------------------------------------------------


@pytest.fixture
def mail(make_app) -> Browser:
    """A logged-in client of a receiver whose ``mail`` handler adds an email to the outbox."""
    b = Browser(make_app(MAIL_SOURCES, IDEMHOOK_ADMIN_TOKEN=TOKEN).test_client())
    b.login()
    return b


def _mail(b: Browser, event_id: str, **payload) -> None:
    """A delivery of the ``mail`` source: its handler calls ``event.outbox.add("email", ...)``."""
    assert deliver(b.client, "mail", {"id": event_id, **payload}).status_code == 200


def smtp(message):
    """An email sender: an address with "bounce" in it is refused (with markup in the error)."""
    to = message.payload["to"]
    if "bounce" in to:
        raise RuntimeError(f"550 <script>alert('error')</script> no mailbox {to}")
    return {"smtp": f"250 2.0.0 Ok: queued as <{message.key}>"}


def _send_due(b: Browser, send=smtp) -> None:
    """One round of the worker's delivery loop (what ``idemhook worker`` runs), one attempt each."""
    work = Delivery(
        b.client.application.extensions["idemhook.db"],
        {"email": Sender("email", send, max_attempts=1)},
    )
    work.step(Worker([work], listen_url=None))


def _message(sql, event_id: str):
    return sql(
        "SELECT id, status, attempts, next_attempt_at <= now() AS due, leased_by, last_error "
        "FROM outbox_messages WHERE event_id = :e",
        e=event_id,
    )[0]


def _outbox_rows(page: str) -> list[list[str]]:
    """The cells of the outbox table's rows, as read (the checkbox column left out)."""
    body = re.search(r'<table class="outbox">.*?<tbody>(.*?)</tbody>', page, flags=re.S).group(1)
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S):
        cells = [text_of(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        rows.append(cells[1:])
    return rows


def test_outbox_lists_the_messages_handlers_added_by_status(mail, sql):
    _mail(mail, "m1", to="ada@example.com")
    _mail(mail, "m2", to="bounce@example.com", subject="<script>alert('subject')</script>")
    _send_due(mail)  # m1 sent, m2 dead (its one attempt refused)
    _mail(mail, "m3", to="bob@example.com")  # pending
    ids = {e: _message(sql, e).id for e in ("m1", "m2", "m3")}

    page = mail.get("/dashboard/outbox").text
    rows = _outbox_rows(page)
    assert [r[0] for r in rows] == [str(ids["m3"]), str(ids["m2"]), str(ids["m1"])]  # newest first
    m3, m2, m1 = rows
    # message, kind, key, status, attempts, created, next attempt / sent, event, error, result
    assert m1[1:5] == ["email", "mail:m1:0", "sent", "1"]
    assert m1[5].endswith("UTC") and m1[6].endswith("UTC")  # created, sent
    assert m1[7:] == ["mail/m1", "-", '{"smtp": "250 2.0.0 Ok: queued as <mail:m1:0>"}', ""]
    assert m2[1:5] == ["email", "mail:m2:0", "dead", "1"] and m2[6] == "-"
    assert "raised RuntimeError: 550 <script>alert('error')</script> no mailbox" in m2[8]
    assert m2[9:] == ["-", "Retry"]
    assert m3[1:5] == ["email", "mail:m3:0", "pending", "0"] and m3[6].endswith("UTC")  # due
    assert m3[7:] == ["mail/m3", "-", "-", "Retry"]
    assert 'href="/dashboard/events/mail/m2"' in page
    assert f'href="/dashboard/outbox/{ids["m2"]}"' in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#39;error&#39;)" in page
    assert "Pending 1 oldest" in text_of(page) and "Dead 1" in text_of(page)

    for status, event_id in (("pending", "m3"), ("sent", "m1"), ("dead", "m2")):
        listed = _outbox_rows(mail.get(f"/dashboard/outbox?status={status}").text)
        assert [r[0] for r in listed] == [str(ids[event_id])], status

    overview_page = text_of(mail.get("/dashboard").text)
    assert re.search(r"Outbox pending 1 oldest \d+ s Outbox dead 1", overview_page)

    # The event's page lists the message its handler added.
    event_page = mail.get("/dashboard/events/mail/m1").text
    assert f'href="/dashboard/outbox/{ids["m1"]}"' in event_page
    assert "Outbox messages (1) email" in text_of(event_page)


def test_a_messages_page_shows_its_payload_error_and_result_as_text(mail, sql):
    _mail(mail, "m2", to="bounce@example.com", subject='"><img src=x onerror=alert(1)>')
    _send_due(mail)
    dead = _message(sql, "m2")
    response = mail.get(f"/dashboard/outbox/{dead.id}")
    assert response.status_code == 200
    page = response.text
    shown = text_of(page)
    assert f"Outbox message {dead.id}" in shown and "Key mail:m2:0 Status dead" in shown
    assert '"subject": "\\"><img src=x onerror=alert(1)>"' in shown  # the payload, as JSON
    assert "RuntimeError: 550 <script>alert('error')</script> no mailbox" in shown
    for raw in ("<script", "<img"):
        assert raw not in page
    assert 'href="/dashboard/events/mail/m2"' in page
    assert "Retry" in shown

    _mail(mail, "m1")
    _send_due(mail)
    sent = mail.get(f"/dashboard/outbox/{_message(sql, 'm1').id}").text
    assert "250 2.0.0 Ok: queued as &lt;mail:m1:0&gt;" in sent
    assert 'name="only"' not in sent  # a sent message has no Retry

    missing = mail.get("/dashboard/outbox/999999")
    assert missing.status_code == 404 and missing.json["error"] == "message_not_found"


@pytest.fixture
def notified(db_url, sql):
    """What the workers were told (``NOTIFY``) since the last call, as a worker LISTENs.

    A marker notification sent at each call arrives after every one committed before
    it (PostgreSQL delivers them in commit order), so "nothing" is known, not waited for.
    """
    conn = psycopg2.connect(
        host=db_url.host, port=db_url.port, user=db_url.username, dbname=db_url.database
    )
    conn.autocommit = True
    conn.cursor().execute(f"LISTEN {CHANNEL}")

    def since_last() -> list[str]:
        sql("SELECT pg_notify(:channel, 'marker')", channel=CHANNEL)
        got: list[str] = []
        deadline = time.monotonic() + 10
        while "marker" not in got:
            assert time.monotonic() < deadline, f"the marker never arrived: {got}"
            select.select([conn], [], [], max(0.0, deadline - time.monotonic()))
            conn.poll()
            got += [n.payload for n in conn.notifies]
            conn.notifies.clear()
        return got[: got.index("marker")]

    yield since_last
    conn.close()


def test_retry_makes_a_dead_message_due_and_wakes_the_workers_which_send_it(
    mail, sql, notified
):
    _mail(mail, "m2", to="bounce@example.com")
    _send_due(mail)
    assert notified() == ["email"]  # the handler's message, when its claim committed
    dead = _message(sql, "m2")
    assert dead.status == "dead"

    done = mail.post("/dashboard/outbox/retry", {"only": str(dead.id), "back": "/dashboard/outbox"})
    assert done.status_code == 303 and done.headers["Location"] == "/dashboard/outbox"
    assert f"Due now, with a fresh set of attempts: message(s) {dead.id}." in text_of(
        mail.get(done.headers["Location"]).text
    )
    again = _message(sql, "m2")
    assert (again.status, again.attempts, again.due, again.leased_by) == ("pending", 0, True, None)
    assert again.last_error == dead.last_error  # kept until the next attempt
    assert notified() == ["email"]  # the workers wake for it

    _send_due(mail, send=lambda message: {"smtp": "250 accepted this time"})  # the server is back
    assert _message(sql, "m2").status == "sent"
    assert "250 accepted this time" in mail.get(f"/dashboard/outbox/{dead.id}").text


def test_retry_selected_retries_each_and_says_which_were_refused(mail, sql):
    _mail(mail, "m1", to="bounce1@example.com")
    _mail(mail, "m2", to="bounce2@example.com")
    _mail(mail, "m3", to="ada@example.com")
    _send_due(mail)
    d1, d2, sent = (_message(sql, e).id for e in ("m1", "m2", "m3"))
    page = mail.get("/dashboard/outbox").text
    assert f'name="message" value="{sent}"' not in page  # a sent message cannot be ticked
    done = mail.client.post(
        "/dashboard/outbox/retry",
        data={"csrf_token": mail.csrf, "message": [str(d1), str(d2), str(sent)]},
        headers=HTML,
    )
    shown = text_of(mail.get(done.headers["Location"]).text)
    assert f"Due now, with a fresh set of attempts: message(s) {d1}, {d2}." in shown
    assert f"Message {sent} not retried: already sent." in shown
    assert [_message(sql, e).status for e in ("m1", "m2", "m3")] == ["pending", "pending", "sent"]

    for junk in ({}, {"message": ["²", "9" * 5000, "-1", str(2**63)]}):
        nothing = mail.post("/dashboard/outbox/retry", junk)
        assert nothing.status_code == 303
        assert "Select at least one message" in text_of(mail.get(nothing.headers["Location"]).text)


def test_a_retry_without_the_csrf_token_changes_nothing(mail, sql, notified):
    _mail(mail, "m2", to="bounce@example.com")
    _send_due(mail)
    assert notified() == ["email"]
    dead = _message(sql, "m2")
    for data in ({"only": str(dead.id)}, {"only": str(dead.id), "csrf_token": "forged"}):
        response = mail.post("/dashboard/outbox/retry", data, csrf=False)
        assert response.status_code == 403 and response.json["error"] == "csrf_failed"
    assert _message(sql, "m2") == dead
    assert notified() == []


def test_outbox_pages_are_keyset_pages_of_the_read_api(mail):
    engine = mail.client.application.extensions["idemhook.db"].engine
    with engine.begin() as conn:
        for n in range(outbox.PAGE + 5):
            add_message(conn, "email", {"n": n}, f"order-{n}")
    first = mail.get("/dashboard/outbox?status=pending").text
    assert len(_outbox_rows(first)) == outbox.PAGE
    assert _outbox_rows(first)[0][2] == f"order-{outbox.PAGE + 4}"
    older = unescape(re.search(r'<a rel="next" href="([^"]+)"', first).group(1))
    assert "status=pending" in older and "cursor=" in older
    second = mail.get(older).text
    assert [r[2] for r in _outbox_rows(second)] == [f"order-{n}" for n in range(4, -1, -1)]
    assert 'rel="next"' not in second and "« Newest" in text_of(second)
    assert _outbox_rows(second)[0][7] == "-"  # added outside a handler: no event to link to

    broken = mail.get("/dashboard/outbox?cursor=not-a-cursor")
    assert broken.status_code == 200
    assert "The cursor is not one this server handed out" in text_of(broken.text)


def test_an_api_source_is_registered_at_its_own_path(make_app):
    from tests.test_operations import API_SOURCES

    app = make_app(API_SOURCES, IDEMHOOK_ADMIN_TOKEN=TOKEN,
                   IDEMHOOK_PUBLIC_URL="https://api.example.com")
    browser = Browser(app.test_client())
    browser.login()
    page = browser.get("/dashboard").text
    # emails is served at its path; orders has none: /webhooks/<name>.
    assert "https://api.example.com/v1/emails" in page
    assert "https://api.example.com/webhooks/emails" not in page
    assert "https://api.example.com/webhooks/orders" in page
