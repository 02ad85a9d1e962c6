"""idempotency-key APIs behind a real PgBouncer in transaction mode: leases hold no session.

Two receiver instances share a server pool smaller than their threads, so consecutive
transactions of one request (the lease, then the operation) run on different server
connections. Every key of a storm still runs once; its copies hear 409 while it runs
and its answer, replayed, after; nothing answers 503. (How fast a 409 comes is not
measured here: with 3 server connections for 16 threads, requests queue in PgBouncer
for a connection, whatever their key; tests/test_operations_concurrency.py times it.)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import requests
from sqlalchemy.engine import URL

from idemhook import create_app
from idemhook.testing import signed
from idemhook.testing.pgbouncer import PgBouncer
from tests.reliability.conftest import GUARD_SECONDS
from tests.servers import gunicorn
from tests.test_operations import API_SOURCES

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

SERVER_POOL = 3
KEYS = 30
COPIES = 6
CLIENTS = 24


@pytest.fixture(scope="module")
def bouncer(pg_server: URL) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode with SERVER_POOL server connections per database."""
    with PgBouncer(pg_server, pool_mode="transaction", default_pool_size=SERVER_POOL) as found:
        yield found


def test_a_key_storm_through_a_transaction_pooler_runs_each_key_once(bouncer, clean_db, sql):
    pooled = bouncer.url_for(clean_db)
    signer = create_app({"DATABASE_URL": clean_db, "IDEMHOOK_CONFIG": API_SOURCES})
    requests_ = []
    for n in range(KEYS):
        client = ("acme", "globex")[n % 2]
        # Every third operation stays in flight a moment, so that its copies meet it there.
        payload = {"to": f"user{n}@example.com", "sleep": 0.3 if n % 3 == 0 else 0}
        url, body, headers = signed(signer, "emails", payload, client=client, key=f"k-{n}")
        requests_ += [(n, copy, body, headers) for copy in range(COPIES)]
    random.Random(12).shuffle(requests_)
    with ExitStack() as stack:
        servers = [stack.enter_context(gunicorn(API_SOURCES, pooled)) for _ in range(2)]

        def send(item):
            n, copy, body, headers = item
            target = servers[copy % 2].url + "/v1/emails"
            answer = requests.post(target, data=body, headers=headers, timeout=GUARD_SECONDS)
            return n, answer

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(send, requests_))
        # Then every key once more: each is done, and answered as it was.
        retries = [send((n, n, body, headers)) for n, _c, body, headers in requests_[:KEYS]]

    statuses = Counter(a.status_code for _n, a in answers)
    assert set(statuses) <= {201, 409}, statuses
    assert statuses[409] > 0  # some copies did meet their key in flight
    first = {}
    for n, answer in answers:
        if answer.status_code == 201 and "Idempotent-Replayed" not in answer.headers:
            assert n not in first, f"key k-{n} ran twice"
            first[n] = answer.json()
        elif answer.status_code == 409:
            assert answer.json()["error"] == "idempotency_key_in_use"
    assert sorted(first) == list(range(KEYS))
    for n, answer in retries:
        assert answer.status_code == 201 and answer.headers["Idempotent-Replayed"] == "true"
        assert answer.json() == first[n]
    rows = sql("SELECT event_id, count(*) AS runs FROM test_effects GROUP BY event_id")
    assert len(rows) == KEYS and all(row.runs == 1 for row in rows)
    assert sql("SELECT count(*) FROM processed_events WHERE status = 'processed'") == [(KEYS,)]
