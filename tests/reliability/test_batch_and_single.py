"""A batch delivery and a single delivery of one of its events, at the same time.

Providers that batch (HubSpot, Shopify's bulk redelivery) retry a failed batch while the
same event may also arrive alone. Each event's claim decides who applies it: the
delivery that comes second waits for the first one's transaction and then answers the
event as a duplicate, **without running its handler**: a handler that calls out (an
e-mail, a CRM) would otherwise act twice, even though the unique index would still keep
its database effects once (docs/guarantees.md). The handler here counts its runs in a
file, outside any transaction, so a run that was rolled back still shows.
"""

from __future__ import annotations

import threading
from collections import Counter

import psycopg2
import pytest
import requests

from idemhook.testing.postgres import connect_args
from tests.conftest import SECRET
from tests.plugins.blocker import LOCK_KEY
from tests.reliability.conftest import FAULT_SOURCES, signed_post, wait_for
from tests.servers import gunicorn

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

SOURCES = {
    "plugins": [*FAULT_SOURCES["plugins"], "tests.plugins.batch_blocker"],
    "sources": {
        **FAULT_SOURCES["sources"],
        "blocking_batch": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "batch": "array",
            "max_batch": 10,
        },
    },
}
#: Long enough that no wait in these tests reaches it: a 503 would hide what they check.
TIMEOUT_MS = 30_000
#: Sessions of this test's database waiting on a lock (the test's own holder never waits).
_WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock'"
)


@pytest.fixture(scope="module")
def server(pg_url):
    with gunicorn(
        SOURCES, pg_url, env={"IDEMHOOK_STATEMENT_TIMEOUT_MS": str(TIMEOUT_MS)}
    ) as server:
        yield server


@pytest.mark.parametrize("first", ["batch", "single"])
def test_the_second_delivery_waits_and_runs_nothing(server, clean_db, sql, tmp_path, first):
    runs = tmp_path / "runs"
    x = {"id": "x", "block": "lock", "runs": str(runs)}
    y = {"id": "y", "runs": str(runs)}
    deliveries = {"batch": [x, y], "single": [x]}
    second = "single" if first == "batch" else "batch"
    answers: dict[str, requests.Response] = {}

    def send(name: str) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: answers.setdefault(
                name, signed_post(server.url, "blocking_batch", deliveries[name])
            )
        )
        thread.start()
        return thread

    holder = psycopg2.connect(**connect_args(clean_db))
    holder.autocommit = True
    threads = []
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        threads.append(send(first))
        # The first delivery's handler of x runs (its run counted) and waits for the test.
        wait_for(lambda: sql(_WAITING)[0][0] == 1, f"the {first} delivery's handler to block")
        threads.append(send(second))
        # The second waits too: on x's claim (or, were it to run x's handler, on the test).
        wait_for(lambda: sql(_WAITING)[0][0] == 2, f"the {second} delivery to wait")
    finally:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        holder.close()
        for thread in threads:
            thread.join(timeout=60)

    assert answers[first].status_code == 200, answers[first].text
    assert answers[second].status_code == 200, answers[second].text
    statuses = {name: [e["status"] for e in answers[name].json()["events"]] for name in answers}
    assert statuses[first] == ["processed"] * len(deliveries[first])
    assert statuses[second] == ["duplicate"] + ["processed"] * (len(deliveries[second]) - 1)
    # Each handler ran once: x's second delivery did not run it, even to roll it back.
    assert Counter(runs.read_text().split()) == {"x": 1, "y": 1}
    assert sorted(r.event_id for r in sql("SELECT event_id FROM test_effects")) == ["x", "y"]
    [[duplicates]] = sql(
        "SELECT duplicate_count FROM processed_events WHERE source = 'blocking_batch' "
        "AND event_id = 'x'"
    )
    assert duplicates == 1
