"""The dashboard's Refused page, the overview's refused count and paused sources."""

from __future__ import annotations

from tests.dashboard.test_views import _row, text_of
from tests.test_refused import forged


def test_the_refused_page_counts_by_code_and_lists_the_latest(browser, sql):
    for _ in range(3):
        assert forged(browser.client).status_code == 401
    assert forged(browser.client, b"hi", **{"Content-Type": "text/plain"}).status_code == 415
    page = browser.get("/dashboard/refused")
    assert page.status_code == 200
    # Per source, by code: 3 bad signatures and 1 wrong type.
    counts = _row(page.text, "acme")
    assert counts == "acme | 3 | 1 | 4"
    header = text_of(page.text.split("<tbody>")[0].rsplit("<thead>", 1)[1])
    assert "invalid_signature unsupported_media_type" in header
    shown = text_of(page.text)
    assert "forger/1.0" in shown and "127.0.0.1" in shown
    assert "hunter2" not in page.text
    assert shown.count("invalid_signature") == 4  # the header and three rows
    only = browser.get("/dashboard/refused?source=batched")
    assert "No refused deliveries of batched." in text_of(only.text)


def test_the_overview_shows_the_refused_count_and_a_paused_source(browser, app, sql):
    for _ in range(2):
        forged(browser.client)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["sources", "pause", "acme", "--reason", "CRM down"]).exit_code == 0
    page = browser.get("/dashboard")
    shown = text_of(page.text)
    assert "Refused deliveries 2" in shown
    assert "acme: paused paused since" in shown and "CRM down" in shown
    assert "acme paused (2 refused)" in _row(page.text, "acme")
    refused = text_of(browser.get("/dashboard/refused").text)
    assert "acme: paused" in refused and "idemhook sources resume SOURCE" in refused
