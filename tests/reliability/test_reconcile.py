"""Reconcile against local fakes of Stripe's and GitHub's list APIs, with live deliveries to
the shipped gunicorn and real ``idemhook worker`` processes, on real PostgreSQL.

The scenario of docs/reconcile.md: of 100 events the provider logged, 60 were delivered
before the run, 30 never were (an outage, a refused secret), and 10 arrive live while
the run is going on. Every one of the 100 must end applied exactly once (one
``test_effects`` row each: that table has no unique constraint), the 30 marked
``received_via = 'reconcile'`` and counted in the metric, whatever the pages, the 429
and the 500 on the way.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from idemhook.testing import signed
from idemhook.testing.pgbouncer import PgBouncer
from tests.fake_providers import GITHUB_TOKEN, HOOK, STRIPE_KEY, Delivery, FakeProvider
from tests.reliability.conftest import GUARD_SECONDS, wait_for
from tests.servers import gunicorn, worker

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

STRIPE_SECRET = "whsec_reconcile_test_secret"
GITHUB_SECRET = "github-reconcile-test-secret"
#: A quicker poll than the default second (the fallback; NOTIFY wakes the workers).
WORKER_ENV = {"IDEMHOOK_WORKER_POLL_MS": "200"}


def sources(api_base: str, *, every: str | None = None) -> dict[str, Any]:
    scheduled = {"every": every} if every else {}
    return {
        "plugins": ["tests.plugins.reconciled"],
        "sources": {
            "stripe": {
                "scheme": "stripe",
                "secret": STRIPE_SECRET,
                "reconcile": {
                    "api_key": STRIPE_KEY,
                    "api_base": api_base,
                    "lookback": "1d",
                    **scheduled,
                },
            },
            "github": {
                "scheme": "github",
                "secret": GITHUB_SECRET,
                "mode": "async",
                "backoff_seconds": 0.2,
                "reconcile": {
                    "token": GITHUB_TOKEN,
                    "hook": HOOK,
                    "api_base": api_base,
                    "lookback": "1d",
                },
            },
            "crm": {
                "scheme": "hmac-sha256",
                "secret": "crm-test-secret",
                "event_id": "body:event_id",
                "event_type": "body:type",
            },
        },
    }


def stripe_event(i: int, created: float) -> dict[str, Any]:
    return {
        "id": f"evt_reconcile_{i:03d}",
        "object": "event",
        "type": "charge.succeeded",
        "created": int(created),
        "livemode": False,
        "data": {"object": {"id": f"ch_{i:03d}", "object": "charge", "amount": 100 + i}},
    }


def post_live(app, server_url: str, source: str, payload: dict, headers=None) -> requests.Response:
    """A live delivery, signed as the provider signs it, to the shipped gunicorn."""
    _url, body, all_headers = signed(app, source, payload, headers)
    return requests.post(
        f"{server_url}/webhooks/{source}", data=body, headers=all_headers, timeout=GUARD_SECONDS
    )


def split(ids: list[str]) -> tuple[set[str], list[str], set[str]]:
    """30 never delivered (spread over every page), 10 delivered during the run (among the
    older half, listed on the run's later pages), 60 delivered before it."""
    never = {ids[i] for i in range(100) if i % 10 in (0, 5, 7)}
    during = [ids[i] for i in range(50) if ids[i] not in never][:10]
    before = set(ids) - never - set(during)
    assert (len(never), len(during), len(before)) == (30, 10, 60)
    return never, during, before


def effects(sql, source: str) -> dict[str, int]:
    rows = sql(
        "SELECT event_id, count(*) FROM test_effects WHERE source = :s GROUP BY 1", s=source
    )
    return dict(rows)


def via(sql, source: str, how: str) -> set[str]:
    rows = sql(
        "SELECT event_id FROM processed_events WHERE source = :s AND received_via = :v",
        s=source,
        v=how,
    )
    return {row[0] for row in rows}


def report_of(output: str) -> dict[str, Any]:
    (line,) = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(line)


def metric(server_url: str, name: str, **labels: str) -> float | None:
    text = requests.get(f"{server_url}/metrics", timeout=GUARD_SECONDS).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_stripe_100_events_30_missed_10_live_during_the_run_all_applied_once(
    clean_db, sql, make_app
):
    now = time.time()
    events = [stripe_event(i, now - 7200 + 60 * i) for i in range(100)]
    ids = [e["id"] for e in events]
    never, during, before = split(ids)
    by_id = {e["id"]: e for e in events}
    with FakeProvider(stripe_events=events, page_size=25) as fake:
        config = sources(fake.url)
        with gunicorn(config, clean_db) as server:
            app = make_app(config)
            runner = app.test_cli_runner()
            for event_id in sorted(before):
                answer = post_live(app, server.url, "stripe", by_id[event_id])
                assert answer.status_code == 200 and answer.json()["status"] == "processed"

            # --dry-run: says what is missing, changes nothing.
            dry = runner.invoke(args=["reconcile", "stripe", "--dry-run", "--json"])
            assert dry.exit_code == 0, dry.output
            assert report_of(dry.output)["would_apply"] == 40
            assert set(report_of(dry.output)["missing"]) == never | set(during)
            assert sql("SELECT count(*) FROM processed_events") == [(60,)]
            assert sql("SELECT count(*) FROM reconcile_runs") == [(0,)]
            assert sum(effects(sql, "stripe").values()) == 60

            # The run: a 429 on the second list request, a 500 on the fourth; while the
            # second page is asked for, the 10 "during" events arrive live.
            base = fake.count("events")
            fake.fault("events", base + 2, 429, {"Retry-After": "1"})
            fake.fault("events", base + 4, 500)
            delivered_during = []

            def live_during(kind: str, number: int, query: Any) -> None:
                if kind == "events" and query.get("starting_after") == ids[75]:
                    if not delivered_during:
                        for event_id in during:
                            answer = post_live(app, server.url, "stripe", by_id[event_id])
                            assert answer.json()["status"] == "processed"
                        delivered_during.append(True)

            fake.on_request = live_during
            run = runner.invoke(args=["reconcile", "stripe", "--json"])
            assert run.exit_code == 0, run.output
            report = report_of(run.output)
            assert delivered_during == [True]
            assert (report["seen"], report["already_applied"], report["applied_now"]) == (
                100,
                70,
                30,
            )
            assert report["failed"] == 0 and report["outcome"] == "succeeded"
            assert set(report["applied"]) == never
            # 4 pages, each asked once, plus the 429's and the 500's repeats.
            run_requests = [r for r in fake.requests if r["kind"] == "events"][base:]
            assert len(run_requests) == 6
            assert all(r["authorization"] == f"Bearer {STRIPE_KEY}" for r in run_requests)
            assert all(r["query"]["limit"] == "100" for r in run_requests)

            assert effects(sql, "stripe") == {event_id: 1 for event_id in ids}
            assert via(sql, "stripe", "reconcile") == never
            assert via(sql, "stripe", "delivery") == before | set(during)
            assert metric(server.url, "idemhook_reconciled_events_total", source="stripe") == 30
            assert (
                metric(
                    server.url,
                    "idemhook_reconcile_runs_total",
                    source="stripe",
                    outcome="succeeded",
                )
                == 1
            )

            # A second run recovers nothing; a late provider retry is a duplicate.
            again = runner.invoke(args=["reconcile", "stripe", "--json"])
            assert again.exit_code == 0, again.output
            second = report_of(again.output)
            assert (second["seen"], second["already_applied"], second["applied_now"]) == (
                100,
                100,
                0,
            )
            retry = post_live(app, server.url, "stripe", by_id[sorted(never)[0]])
            assert retry.json()["status"] == "duplicate"
            assert effects(sql, "stripe") == {event_id: 1 for event_id in ids}
            assert metric(server.url, "idemhook_reconciled_events_total", source="stripe") == 30
            assert sql(
                "SELECT outcome, seen, already, recovered, failed FROM reconcile_runs "
                "ORDER BY id"
            ) == [("succeeded", 100, 70, 30, 0), ("succeeded", 100, 100, 0, 0)]


def github_deliveries(now: float) -> list[Delivery]:
    deliveries = [
        Delivery(
            id=1000 + i,
            guid=str(uuid.UUID(int=i + 1)),
            event="issues",
            delivered_at=datetime.fromtimestamp(now - 7200 + 60 * i, UTC),
            payload={"action": "opened", "issue": {"number": i}, "hook_id": 4242},
        )
        for i in range(100)
    ]
    return deliveries


def test_github_async_100_deliveries_30_missed_10_live_during_the_run_applied_once_by_the_worker(
    clean_db, sql, make_app
):
    now = time.time()
    deliveries = github_deliveries(now)
    guids = [d.guid for d in deliveries]
    never, during, before = split(guids)
    by_guid = {d.guid: d for d in deliveries}
    # A redelivery of a missed one (same guid: one event) and the hook's ping (never
    # recorded by the live source, so never recovered).
    redelivered = by_guid[sorted(never)[0]]
    extra = [
        Delivery(
            id=5000,
            guid=redelivered.guid,
            event="issues",
            delivered_at=redelivered.delivered_at + timedelta(seconds=30),
            payload=redelivered.payload,
            redelivery=True,
        ),
        Delivery(
            id=5001,
            guid=str(uuid.uuid4()),
            event="ping",
            delivered_at=datetime.fromtimestamp(now - 7300, UTC),
            payload={"zen": "Keep it logically awesome.", "hook_id": 4242},
        ),
    ]

    def live(app, server_url: str, delivery: Delivery) -> requests.Response:
        return post_live(
            app,
            server_url,
            "github",
            delivery.payload,
            {"X-GitHub-Delivery": delivery.guid, "X-GitHub-Event": delivery.event},
        )

    with FakeProvider(deliveries=deliveries + extra, page_size=30) as fake:
        config = sources(fake.url)
        with (
            gunicorn(config, clean_db) as server,
            worker(config, clean_db, env=WORKER_ENV) as running,
        ):
            app = make_app(config)
            for guid in sorted(before):
                assert live(app, server.url, by_guid[guid]).status_code == 202
            wait_for(lambda: sum(effects(sql, "github").values()) == 60, "60 applied live")

            # The second list page is rate-limited (x-ratelimit-remaining: 0, reset now),
            # the third delivery fetched answers 500; each "during" delivery arrives live
            # while the run fetches it, after the run found no claim of it.
            fake.fault(
                "deliveries",
                2,
                403,
                {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()))},
                {"message": "API rate limit exceeded"},
            )
            fake.fault("delivery", 3, 500)
            raced = []
            lock = threading.Lock()
            during_ids = {by_guid[g].id: by_guid[g] for g in during}

            def live_during(kind: str, number: int, detail: Any) -> None:
                if kind == "delivery" and detail in during_ids:
                    with lock:
                        raced.append(detail)
                    assert live(app, server.url, during_ids[detail]).status_code == 202

            fake.on_request = live_during
            run = app.test_cli_runner().invoke(args=["reconcile", "github", "--json"])
            assert run.exit_code == 0, run.output
            report = report_of(run.output)
            assert sorted(raced) == sorted(during_ids)
            assert (report["seen"], report["already_applied"], report["applied_now"]) == (
                100,
                70,
                30,
            )
            assert set(report["applied"]) == never
            # Only deliveries without a claim are fetched: the 40, and the 500's repeat.
            assert fake.count("delivery") == 41
            assert all(r["authorization"] == f"Bearer {GITHUB_TOKEN}" for r in fake.requests)
            assert all(r["api_version"] == "2022-11-28" for r in fake.requests)

            # The worker applies what the run recorded as received.
            wait_for(lambda: sum(effects(sql, "github").values()) == 100, "all 100 applied")
            assert effects(sql, "github") == {guid: 1 for guid in guids}
            assert via(sql, "github", "reconcile") == never
            assert sql(
                "SELECT count(*) FROM processed_events WHERE source = 'github' "
                "AND status <> 'processed'"
            ) == [(0,)]
            assert metric(server.url, "idemhook_reconciled_events_total", source="github") == 30

            again = report_of(
                app.test_cli_runner().invoke(args=["reconcile", "github", "--json"]).output
            )
            assert (again["seen"], again["already_applied"], again["applied_now"]) == (
                100,
                100,
                0,
            )
            assert "Traceback" not in running.log()
    assert effects(sql, "github") == {guid: 1 for guid in guids}


@pytest.mark.parametrize("pooled", [False, True], ids=["direct", "pgbouncer-transaction"])
def test_two_workers_with_every_reconcile_each_slot_once_and_apply_each_event_once(
    clean_db, sql, make_app, pg_server, pooled
):
    """Two workers share the schedule; with ``pooled`` they reach the database through
    PgBouncer in transaction mode (LISTEN direct, as docs/operations.md says): the fence is
    rows and a unique index, no session state."""
    now = time.time()
    events = [stripe_event(i, now - 7200 + 60 * i) for i in range(100)]
    ids = [e["id"] for e in events]
    never = {ids[i] for i in range(100) if i % 10 in (0, 5, 7)}
    with FakeProvider(stripe_events=events, page_size=25) as fake, ExitStack() as stack:
        config = sources(fake.url, every="1s")
        with gunicorn(config, clean_db) as server:
            app = make_app(config)
            for event in events:
                if event["id"] not in never:
                    assert post_live(app, server.url, "stripe", event).status_code == 200
            url, env = clean_db, dict(WORKER_ENV)
            if pooled:
                bouncer = stack.enter_context(
                    PgBouncer(pg_server, pool_mode="transaction", default_pool_size=2)
                )
                url = bouncer.url_for(clean_db)
                env["IDEMHOOK_WORKER_LISTEN_URL"] = clean_db.render_as_string(
                    hide_password=False
                )
            with worker(config, url, count=2, env=env) as workers:
                wait_for(
                    lambda: sql(
                        "SELECT count(*) FROM reconcile_runs WHERE outcome = 'succeeded'"
                    )[0][0]
                    >= 5,
                    "five scheduled runs",
                )
                for process in workers:
                    assert process.stop() == 0  # SIGTERM: a run in hand ends interrupted
                logs = {process.pid: process.log() for process in workers}

    runs = sql(
        "SELECT scheduled_for, started_at, finished_at, outcome, recovered, owner, started_by "
        "FROM reconcile_runs ORDER BY started_at, id"
    )
    slots = [run[0] for run in runs]
    assert None not in slots and len(slots) == len(set(slots)), runs  # each slot run once
    assert {run[6] for run in runs} == {"worker"}
    finished = [run for run in runs if run[2] is not None]
    for earlier, later in zip(finished, finished[1:], strict=False):
        assert later[1] >= earlier[2], (earlier, later)  # never two runs of a source at once
    assert sum(run[4] for run in runs) == 30
    assert effects(sql, "stripe") == {event_id: 1 for event_id in ids}
    assert via(sql, "stripe", "reconcile") == never
    # Every run is one of the two workers', and each logged the runs it did.
    owners = {int(run[5].rsplit(":", 1)[1]) for run in runs}
    assert owners <= set(logs)
    done = re.compile(r"reconcile stripe: run \d+ \w+: saw")
    logged = sum(len(done.findall(log)) for log in logs.values())
    assert logged == len(runs)
    for log in logs.values():
        assert "Traceback" not in log


def test_a_worker_stopped_mid_run_records_it_interrupted_and_exits_cleanly(clean_db, sql):
    events = [stripe_event(i, time.time() - 3600) for i in range(10)]
    asked = threading.Event()
    answer = threading.Event()

    def hold(kind: str, number: int, query: Any) -> None:
        if kind == "events":
            asked.set()
            answer.wait(GUARD_SECONDS)  # the page is answered when the test says so

    with FakeProvider(stripe_events=events, page_size=5) as fake:
        fake.on_request = hold
        config = sources(fake.url, every="1h")
        with worker(config, clean_db, env=WORKER_ENV) as running:
            assert asked.wait(GUARD_SECONDS), "the scheduled run never asked for events"
            running.process.send_signal(signal.SIGTERM)
            answer.set()
            assert running.process.wait(GUARD_SECONDS) == 0
            log = running.log()
    assert sql("SELECT outcome, error, started_by FROM reconcile_runs") == [
        ("interrupted", "stopped: its worker was told to stop", "worker")
    ]
    assert sql("SELECT count(*) FROM processed_events") == [(0,)]
    assert re.search(r"reconcile stripe: run \d+ interrupted: saw 0", log)
    assert "Traceback" not in log
