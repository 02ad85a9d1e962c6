"""A flood of forged deliveries: the cap holds per source and minute, valid ones still pass."""

from __future__ import annotations

import http.client
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from idemhook import create_app
from idemhook.testing import signed
from tests.conftest import SOURCES
from tests.servers import gunicorn


@pytest.fixture(autouse=True)
def no_earlier_refusals(sql):
    """Refusals other tests' servers recorded (tests that start gunicorn on the shared
    database empty no table) are not this test's."""
    sql("DELETE FROM rejected_deliveries")


pytestmark = pytest.mark.gunicorn

FORGED = 10_000
VALID = 50
CAP = 60  # IDEMHOOK_REJECTIONS_PER_MINUTE's default


def flood(url: str, total: int, threads: int) -> Counter:
    """POST ``total`` forged deliveries over ``threads`` kept-alive connections; the statuses."""
    parts = urlsplit(url)
    body = b'{"id": "forged", "type": "contact.updated"}'
    headers = {
        "Content-Type": "application/json",
        "X-Signature": "sha256=" + "0" * 64,
        "User-Agent": "flood/1.0",
    }

    def send(count: int) -> Counter:
        statuses: Counter = Counter()
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            for _ in range(count):
                connection.request("POST", parts.path, body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
                statuses[answer.status] += 1
        finally:
            connection.close()
        return statuses

    shares = [total // threads + (1 if n < total % threads else 0) for n in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(send, shares), Counter())


def test_ten_thousand_forged_deliveries_leave_the_cap_and_valid_ones_pass(pg_url, make_app, sql):
    make_app()  # empties the tables afterwards
    signer = create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": SOURCES})
    with gunicorn(SOURCES, pg_url) as server, ThreadPoolExecutor(1) as background:
        # The shipped settings: 2 workers x 4 threads; 16 forgers at once.
        forged = background.submit(flood, f"{server.url}/webhooks/acme", FORGED, 16)
        # The flood is on once its refusals are being recorded.
        while not sql("SELECT 1 FROM rejected_deliveries LIMIT 1"):
            assert not forged.done(), forged.result()
        answers = []
        for n in range(VALID):
            event = {"id": f"valid-{n}", "type": "contact.updated"}
            _, body, headers = signed(signer, "acme", event)
            answers.append(
                requests.post(f"{server.url}/webhooks/acme", data=body, headers=headers, timeout=30)
            )
        flooding = not forged.done()  # still on when the last valid one was answered
        statuses = forged.result()
    signer.extensions["idemhook.db"].engine.dispose()

    assert statuses == Counter({401: FORGED})
    assert flooding, "the valid deliveries were not sent during the flood"
    # Every valid delivery answered and applied, once.
    assert [a.status_code for a in answers] == [200] * VALID
    assert {a.json()["status"] for a in answers} == {"processed"}
    applied = sql("SELECT count(*), count(DISTINCT event_id) FROM test_effects")
    assert applied == [(VALID, VALID)]
    # At most the cap plus one summary row per source and minute; every refusal counted once.
    per_minute = sql(
        "SELECT source, minute, count(*), sum(count) FROM rejected_deliveries "
        "GROUP BY source, minute"
    )
    assert {source for source, *_ in per_minute} == {"acme"}
    assert all(rows <= CAP + 1 for _, _, rows, _ in per_minute), per_minute
    assert sum(total for *_, total in per_minute) == FORGED
    assert sql("SELECT count(*) FROM rejected_deliveries WHERE body_sha256 IS NULL") == [(0,)]
