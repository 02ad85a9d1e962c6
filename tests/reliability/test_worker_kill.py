"""A gunicorn worker killed (SIGKILL) while its handler is inside the claim's transaction.

The receivers run the shipped gunicorn settings (gthread): a killed worker takes
every request it was serving with it, so a redelivery that must survive the kill
goes to a second receiver instance on the same database, as a deployment with
more than one instance (or a provider retrying through a load balancer) sends it.
"""

from __future__ import annotations

import os
import signal
import threading

import psycopg2
import pytest
import requests

from idemhook.testing.postgres import connect_args
from tests.plugins.blocker import APPLICATION_NAME_PREFIX, LOCK_KEY
from tests.reliability.conftest import FAULT_SOURCES, signed_post, wait_for
from tests.servers import gunicorn

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]


#: A long timeout: the handler must stay stuck until the test kills its worker.
STUCK = {"IDEMHOOK_STATEMENT_TIMEOUT_MS": "60000"}


def test_killed_worker_leaves_no_claim_and_a_waiting_redelivery_applies_once(clean_db, sql):
    event = {"id": "kill-1", "block": "lock"}
    with (
        gunicorn(FAULT_SOURCES, clean_db, env=STUCK) as server,
        gunicorn(FAULT_SOURCES, clean_db, env=STUCK) as other,
    ):
        holder = psycopg2.connect(**connect_args(clean_db))
        holder.autocommit = True
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))

            answers: dict[str, object] = {}

            def send(name: str, url: str) -> None:
                try:
                    answers[name] = signed_post(url, "blocking", event)
                except requests.ConnectionError as exc:
                    answers[name] = exc

            first = threading.Thread(target=send, args=("first", server.url))
            first.start()
            [(backend_pid, app_name)] = wait_for(
                lambda: sql(
                    "SELECT pid, application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE :p "
                    "AND wait_event = 'advisory'",
                    p=f"{APPLICATION_NAME_PREFIX}%",
                ),
                "the handler to block on the advisory lock",
            )
            worker_pid = int(app_name.removeprefix(APPLICATION_NAME_PREFIX))
            assert worker_pid in server.worker_pids()

            # The provider times out and redelivers, to the other instance: that delivery
            # waits on the claim's row.
            second = threading.Thread(target=send, args=("second", other.url))
            second.start()
            wait_for(
                lambda: sql(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event = 'transactionid'"
                ),
                "the redelivery to wait on the first delivery's claim",
            )

            os.kill(worker_pid, signal.SIGKILL)
            first.join(timeout=30)
            assert isinstance(answers["first"], requests.ConnectionError)  # no answer at all
            with holder.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            # The dead worker's session rolls back when PostgreSQL notices the closed socket.
            wait_for(
                lambda: not sql("SELECT 1 FROM pg_stat_activity WHERE pid = :p", p=backend_pid),
                "the killed worker's database session to end",
            )
            second.join(timeout=30)
        finally:
            holder.close()

        redelivered = answers["second"]
        assert isinstance(redelivered, requests.Response)
        assert redelivered.status_code == 200
        assert redelivered.json()["status"] == "processed"

        again = signed_post(server.url, "blocking", {"id": "kill-1"})
        assert again.status_code == 200 and again.json()["status"] == "duplicate"

        # gunicorn replaced the killed worker and the receiver serves as before.
        wait_for(lambda: worker_pid not in server.worker_pids(), "the killed worker to exit")
        server.wait_ready()
        assert len(server.worker_pids()) == server.workers
        assert signed_post(server.url, "blocking", {"id": "kill-2"}).json()["status"] == (
            "processed"
        )

    assert sql("SELECT event_id, count(*) FROM test_effects GROUP BY event_id ORDER BY 1") == [
        ("kill-1", 1),
        ("kill-2", 1),
    ]
    assert sql("SELECT event_id, duplicate_count FROM processed_events ORDER BY 1") == [
        ("kill-1", 1),
        ("kill-2", 0),
    ]
    # A crash is not a handler failure: nothing was recorded as failed.
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == 0


def test_killed_worker_without_redelivery_leaves_nothing(clean_db, sql):
    with gunicorn(FAULT_SOURCES, clean_db, env=STUCK) as server:
        holder = psycopg2.connect(**connect_args(clean_db))
        holder.autocommit = True
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            errors: list[Exception] = []

            def send() -> None:
                try:
                    signed_post(server.url, "blocking", {"id": "kill-3", "block": "lock"})
                except requests.ConnectionError as exc:
                    errors.append(exc)

            thread = threading.Thread(target=send)
            thread.start()
            [(backend_pid, app_name)] = wait_for(
                lambda: sql(
                    "SELECT pid, application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event = 'advisory'"
                ),
                "the handler to block on the advisory lock",
            )
            # Its effect is written but not committed: invisible to everyone else.
            assert sql("SELECT count(*) FROM test_effects")[0][0] == 0
            os.kill(int(app_name.removeprefix(APPLICATION_NAME_PREFIX)), signal.SIGKILL)
            thread.join(timeout=30)
            assert len(errors) == 1
            with holder.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            wait_for(
                lambda: not sql("SELECT 1 FROM pg_stat_activity WHERE pid = :p", p=backend_pid),
                "the killed worker's database session to end",
            )
        finally:
            holder.close()

    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 0
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == 0
