"""idempotency-key APIs under a real gunicorn: in-flight 409s at once, expiry races, crashes.

Clients are threads sending over HTTP to the shipped gunicorn settings (2 workers x 4
threads); requests are signed by an in-process app built from the same sources.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from idemhook import create_app
from idemhook.testing import signed
from tests.reliability.conftest import wait_for
from tests.servers import gunicorn
from tests.test_operations import API_SOURCES

pytestmark = pytest.mark.gunicorn

#: Guard against a hung test; never a performance assertion.
GUARD = 60.0


@pytest.fixture
def signer(make_app, db_url):
    """An app that signs requests as the server's sources expect (and empties the tables)."""
    make_app(API_SOURCES)
    return create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": API_SOURCES})


def timed_post(barrier, url, body, headers) -> tuple[requests.Response, float]:
    barrier.wait()
    started = time.monotonic()
    response = requests.post(url, data=body, headers=headers, timeout=GUARD)
    return response, time.monotonic() - started


def effects(sql, source: str) -> int:
    return sql("SELECT count(*) FROM test_effects WHERE source = :s", s=source)[0][0]


def test_twenty_requests_with_one_key_run_once_and_the_others_hear_409_at_once(
    signer, db_url, sql
):
    requests_ = 20
    with gunicorn(API_SOURCES, db_url) as server:
        url, body, headers = signed(
            signer, "emails", {"to": "a@example.com", "sleep": 2}, client="acme", key="storm"
        )
        barrier = threading.Barrier(requests_)
        # Meanwhile, watch for any backend of the database waiting for a lock held by the
        # request that runs the operation (its session is labelled test-handler-<pid>):
        # the copies must read the key's state, never queue behind it. (Two copies racing
        # to lease the key may wait a moment for each other's lease to commit, on a busy
        # machine: that is not queueing behind the operation.)
        waits: list[object] = []
        storm_over = threading.Event()

        def watch() -> None:
            while not storm_over.is_set():
                waits.extend(
                    sql(
                        "SELECT a.pid, l.locktype FROM pg_locks l JOIN pg_stat_activity a "
                        "USING (pid) WHERE NOT l.granted AND a.datname = current_database() "
                        "AND EXISTS (SELECT 1 FROM pg_stat_activity b WHERE b.pid = "
                        "ANY(pg_blocking_pids(a.pid)) AND b.application_name LIKE 'test-handler-%')"
                    )
                )
                storm_over.wait(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(requests_) as pool:
            futures = [
                pool.submit(timed_post, barrier, server.url + "/v1/emails", body, headers)
                for _ in range(requests_)
            ]
            answers = [f.result() for f in futures]
        storm_over.set()
        watcher.join()
        retry = requests.post(server.url + "/v1/emails", data=body, headers=headers, timeout=GUARD)

    statuses = sorted(r.status_code for r, _ in answers)
    assert 503 not in statuses
    assert waits == [], "a request waited for a lock"
    ran = [r for r, _ in answers if r.status_code == 201 and "Idempotent-Replayed" not in r.headers]
    assert len(ran) == 1, statuses
    for response, seconds in answers:
        if response is ran[0]:
            continue
        if response.status_code == 409:
            assert response.headers["Retry-After"] == "1"
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.json()["error"] == "idempotency_key_in_use"
            assert seconds < 0.5, f"a 409 took {seconds:.3f} s"
        else:  # the first had finished: its answer, replayed
            assert response.status_code == 201
            assert response.headers["Idempotent-Replayed"] == "true"
            assert response.json() == ran[0].json()
    assert statuses.count(409) >= 1
    assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == ran[0].json()
    assert effects(sql, "emails") == 1


def test_an_expired_key_runs_again_and_two_racing_requests_on_it_run_it_once(
    signer, make_app, db_url, sql
):
    config = {**API_SOURCES, "sources": {**API_SOURCES["sources"]}}
    config["sources"]["charges"] = {**config["sources"]["charges"], "key_ttl": "2s"}
    ttl_signer = create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": config})
    with gunicorn(config, db_url) as server:
        target = server.url + "/v1/charges"
        url, body, headers = signed(ttl_signer, "charges", {"amount": 5}, key="ttl-1")
        first = requests.post(target, data=body, headers=headers, timeout=GUARD)
        answered = time.monotonic()
        assert first.status_code == 201
        within = requests.post(target, data=body, headers=headers, timeout=GUARD)
        assert within.headers["Idempotent-Replayed"] == "true"
        assert effects(sql, "charges") == 1

        # key_ttl is the behaviour under test: the key must be new once 3 s have passed.
        time.sleep(max(0.0, answered + 3 - time.monotonic()))
        again = requests.post(target, data=body, headers=headers, timeout=GUARD)
        assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
        assert again.json()["id"] == first.json()["id"] + 1
        assert effects(sql, "charges") == 2

        # Expired again; now several requests race for it (the handler holds it 0.5 s).
        _, racing_body, racing_headers = signed(
            ttl_signer, "charges", {"amount": 5, "sleep": 0.5}, key="ttl-2"
        )
        seed = requests.post(target, data=racing_body, headers=racing_headers, timeout=GUARD)
        assert seed.status_code == 201
        time.sleep(3)  # let ttl-2 expire (key_ttl = 2s)
        barrier = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(timed_post, barrier, target, racing_body, racing_headers)
                for _ in range(8)
            ]
            answers = [f.result()[0] for f in futures]
    new = [r for r in answers if r.status_code == 201 and "Idempotent-Replayed" not in r.headers]
    assert len(new) == 1, [r.status_code for r in answers]
    assert all(r.status_code in (201, 409) for r in answers)
    assert effects(sql, "charges") == 4  # ttl-1 twice, ttl-2 twice: once per expiry
    [row] = sql("SELECT duplicate_count, status FROM processed_events WHERE event_id = 'ttl-2'")
    assert row.status == "processed"


def test_a_worker_killed_in_flight_leaves_a_lease_that_expires(signer, db_url, sql):
    # Short bounds, so the lease (handler timeout + 2 x statement timeout + 1 s) is 3.5 s.
    env = {"IDEMHOOK_STATEMENT_TIMEOUT_MS": "500", "IDEMHOOK_HANDLER_TIMEOUT_MS": "1500"}
    with gunicorn(API_SOURCES, db_url, env=env) as server:
        target = server.url + "/v1/emails"
        url, body, headers = signed(
            signer, "emails", {"to": "k@example.com", "sleep": 30}, client="acme", key="crash"
        )
        answers: list[object] = []

        def send() -> None:
            try:
                answers.append(requests.post(target, data=body, headers=headers, timeout=GUARD))
            except requests.ConnectionError as exc:
                answers.append(exc)

        first = threading.Thread(target=send)
        first.start()
        [(app_name,)] = wait_for(
            lambda: sql(
                "SELECT application_name FROM pg_stat_activity WHERE datname = "
                "current_database() AND application_name LIKE 'test-handler-%'"
            ),
            "the operation to be running",
        )
        os.kill(int(app_name.removeprefix("test-handler-")), signal.SIGKILL)
        first.join(timeout=GUARD)
        assert isinstance(answers[0], requests.ConnectionError)
        [lease] = sql("SELECT status, locked_until > now() AS live FROM processed_events")
        assert (lease.status, lease.live) == ("in_flight", True)
        assert effects(sql, "emails") == 0  # its work died with its transaction

        server.wait_ready()  # gunicorn's replacement worker
        _, retry_body, retry_headers = signed(
            signer, "emails", {"to": "k@example.com", "sleep": 0}, client="acme", key="crash"
        )
        # The retry carries another body (no sleep) only to finish quickly: while the
        # lease holds, that is key reuse (422, the draft's answer whatever the first
        # request's state); once it has expired, the key's fingerprint is replaced with
        # the lease, as for a new request.
        refused = requests.post(target, data=retry_body, headers=retry_headers, timeout=GUARD)
        assert (refused.status_code, refused.json()["error"]) == (422, "idempotency_key_mismatch")
        done = wait_for(
            lambda: (
                r
                if (r := requests.post(target, data=retry_body, headers=retry_headers)).status_code
                == 201
                else None
            ),
            "the lease to expire and the retry to run",
        )
    assert "Idempotent-Replayed" not in done.headers
    assert effects(sql, "emails") == 1


@pytest.fixture(scope="module")
def api_server(pg_url):
    """The shipped gunicorn settings serving the test APIs."""
    with gunicorn(API_SOURCES, pg_url) as server:
        yield server


@pytest.mark.parametrize(
    ("key", "status", "code"),
    [
        (None, 400, "missing_idempotency_key"),
        ("", 400, "invalid_idempotency_key"),
        ("k" * 256, 400, "invalid_idempotency_key"),
        ("tab\tkey", 400, "invalid_idempotency_key"),
        ("two,keys", 400, "invalid_idempotency_key"),
        # gunicorn itself refuses other control characters in a header (its own 400, an
        # HTML page), before idemhook sees the request.
        ("bad\x01key", 400, None),
        ("k" * 255, 201, None),
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', 201, None),
    ],
    ids=["missing", "empty", "256", "tab", "comma", "control", "255", "quoted"],
)
def test_key_syntax_over_real_http(signer, api_server, sql, key, status, code):
    from tests.test_hostile_input import exchange, request_head

    body = json.dumps({"to": "x"}).encode()
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer acme-token-0123456789",
        "Content-Length": str(len(body)),
    }
    if key is not None:
        headers["Idempotency-Key"] = key
    got, head, answer = exchange(api_server, request_head("/v1/emails", headers) + body)
    assert got == status, answer[:300]
    if code is not None:
        assert b"application/problem+json" in head
        assert json.loads(answer)["error"] == code
    stored = sql("SELECT event_id FROM processed_events")
    if status == 201:
        assert [r.event_id for r in stored] == [f"acme:{key.strip(chr(34))}"]
    else:
        assert stored == []
