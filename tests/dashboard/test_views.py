"""The dashboard's pages and actions (Flask's test client on the real PostgreSQL)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html import unescape

import pytest

from app.dashboard import overview, views
from idemhook.testing import deliver
from tests.dashboard.conftest import HTML, TOKEN, Browser
from tests.test_events_cli import seed


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
    # events: a0 a1 a2 inv rej; duplicates 2 of 7 deliveries
    # (The last figure is Pending: events of asynchronous sources waiting for the worker.)
    assert _row(page, "acme") == (
        "acme | 5 | 2 | 28.6% | 1 | 1 | 1 | 0 | "
        "http://localhost/webhooks/acme (as this page was reached)"
    )
    assert _row(page, "open").startswith("open | 0 | 0 | - | 0 | 0 | 0 | 0 |")
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
    assert "Outbox" not in page  # no outbox_messages table
    assert "waiting to be processed" not in page  # nothing waits for the worker


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
    assert _row(page, "queued").startswith("queued | 2 | 0 | 0.0% | 0 | 0 | 0 | 2 (oldest")


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


def test_the_client_filter_waits_for_clients(browser):
    # Offered once the read API's filters know clients (Idempotency-Key sources' clients).
    page = browser.get("/dashboard/events").text
    assert 'name="client"' not in page
    assert views._optional_filters() == []


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
    done = browser.post("/dashboard/failures/retry", {})
    assert "Select at least one failure" in text_of(browser.get(done.headers["Location"]).text)


# -- outbox ----------------------------------------------------------------------------------


def test_outbox_page_says_there_is_none_yet(browser):
    page = browser.get("/dashboard/outbox")
    assert page.status_code == 200
    assert "There is no outbox in this database yet" in text_of(page.text)


@pytest.fixture
def outbox_table(sql):
    """The outbox's table as its issue describes it (for the dashboard's side only)."""
    sql(
        "CREATE TABLE outbox_messages (id BIGSERIAL PRIMARY KEY, kind VARCHAR(64) NOT NULL, "
        "key VARCHAR(255) NOT NULL, payload JSONB, status VARCHAR(16) NOT NULL, "
        "attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TIMESTAMPTZ, last_error TEXT, "
        "created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    yield
    sql("DROP TABLE outbox_messages")
    views._outbox_seen.clear()


def test_outbox_shows_messages_by_status_and_retries_a_dead_one(browser, sql, outbox_table):
    sql(
        "INSERT INTO outbox_messages (kind, key, status, attempts, last_error) VALUES "
        "('email', 'k1', 'sent', 1, NULL), ('email', 'k2', 'dead', 8, 'SMTP 554 <refused>'), "
        "('email', 'k3', 'pending', 0, NULL)"
    )
    overview_page = text_of(browser.get("/dashboard").text)
    assert "Outbox pending 1" in overview_page and "Outbox dead 1" in overview_page
    page = browser.get("/dashboard/outbox?status=dead").text
    assert "SMTP 554 &lt;refused&gt;" in page
    assert "k2" in page and "k1" not in page
    dead_id = sql("SELECT id FROM outbox_messages WHERE key = 'k2'")[0][0]
    done = browser.post("/dashboard/outbox/retry", {"only": str(dead_id)})
    after = text_of(browser.get(done.headers["Location"]).text)
    assert "1 message(s) due for delivery now" in after
    status, due = sql("SELECT status, next_attempt_at FROM outbox_messages WHERE key = 'k2'")[0]
    assert status == "pending" and due is not None
