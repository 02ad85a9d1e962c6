"""The benchmark runs end to end in quick mode and reports every scenario and target.

It asserts that the bench works and reports, never a speed (that is `make bench`'s job).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench import report
from bench.asynchronous import half_load
from bench.run import QUICK, Bench

# The quick plan without its warm-up and with the shortest memory run: ~20 s in all.
SMOKE = replace(QUICK, warmup_seconds=0, rss_events=1, paced_seconds=2)

pytestmark = pytest.mark.gunicorn


def test_quick_bench_reports_every_scenario_and_target(tmp_path, pg_server):
    bench = Bench(SMOKE, tmp_path / "results", server=pg_server)
    try:
        bench.setup()
        results = bench.run()
    finally:
        bench.teardown()

    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(saved["scenarios"]) == {
        "new",
        "fresh",
        "duplicates",
        "dup10",
        "idem_new",
        "idem_replays",
        "batch",
        "paced",
        "paced_own",
        *(f"rows_{n}" for n in SMOKE.prefill),
        "async_ack",
    }
    for name, scenario in saved["scenarios"].items():
        for server in ("receiver", "baseline"):
            median = scenario["median"][server]
            assert median["rps"] > 0, (name, server)
            assert median["p99_ms"] >= median["p50_ms"] > 0, (name, server)
        assert scenario["ratio_rps"] > 0
    assert saved["scenarios"]["batch"]["median"]["receiver"]["events_per_s"] > 0
    # Every run counts its workers' thread switches and the machine's stolen time.
    for server in ("receiver", "baseline"):
        for run in saved["scenarios"]["new"]["runs"][server]:
            assert run["switches_per_request"] > 0 and 0 <= run["steal_percent"] <= 100, run
    # The paced (p99) runs last paced_seconds, the others seconds; each round's p99s are kept.
    paced = saved["scenarios"]["paced"]
    for name, seconds in (("paced", SMOKE.paced_seconds), ("new", SMOKE.seconds)):
        for server in ("receiver", "baseline"):
            lengths = [run["seconds"] for run in saved["scenarios"][name]["runs"][server]]
            assert all(abs(length - seconds) < 0.5 for length in lengths), (name, lengths)
    assert len(paced["runs"]["receiver"]) == SMOKE.paced_rounds
    # The same-utilisation runs: each server paced at the fraction of its own peak.
    own = saved["scenarios"]["paced_own"]
    for server in ("receiver", "baseline"):
        peak = saved["scenarios"]["new"]["median"][server]["rps"]
        assert own["rates"][server] == round(peak * SMOKE.paced_fraction), (server, own)
        assert len(own["runs"][server]) == SMOKE.paced_rounds
    # The p99 over every request of the rounds: within the rounds' own p99s, and taken
    # over as many requests as wrk recorded in them.
    for server in ("receiver", "baseline"):
        rounds = paced["runs"][server]
        pooled = paced["pooled"][server]
        assert pooled["requests"] >= sum(run["requests"] for run in rounds)
        p99s = [run["p99_ms"] for run in rounds]
        assert min(p99s) <= pooled["p99_ms"] <= max(p99s), (pooled, p99s)
    assert saved["rss"]["events"] >= SMOKE.rss_events
    assert all(size > 0 for size in saved["rss"]["samples"][-1]["rss_mb"])
    outbox = saved["outbox"]
    assert outbox["drain"]["messages"] == SMOKE.outbox_messages and outbox["drain"]["per_s"] > 0
    latency = outbox["latency"]
    assert latency["messages"] == int(SMOKE.outbox_rate * SMOKE.outbox_seconds)
    assert latency["p99_ms"] >= latency["p50_ms"] > 0
    assert saved["idempotency"]["ratio_rps"] > 0  # replays against new keys, reported
    queued = saved["async"]
    assert queued["drain"]["events"] == SMOKE.async_events and queued["drain"]["per_s"] > 0
    assert queued["latency"]["p99_ms"] >= queued["latency"]["p50_ms"] > 0
    # Paced at half of what the ack path and the workers serve together, each measured alone.
    ack_peak = saved["scenarios"]["async_ack"]["median"]["receiver"]["rps"]
    expected = half_load(queued["drain"]["per_s"], ack_peak)
    assert queued["latency"]["rate"] == round(expected) < queued["drain"]["per_s"] / 2
    assert len(results["targets"]) == 17
    targets = {check["target"] for check in results["targets"]}
    assert "Receiver >= 0.85 x baseline req/s, 10% duplicates" in targets
    assert any(t.startswith("p99 at 70% of the receiver's peak <= 1.10 x") for t in targets)
    assert all(isinstance(check["met"], bool) for check in results["targets"])

    page = report.write(saved, docs=tmp_path / "docs")
    text = page.read_text()
    assert "{{" not in text
    assert "| all new events |" in text
    assert "thread switches/request" in text and "(`/proc/stat`'s steal)" in text
    assert "**The same p99 at the same utilisation** (not a target)" in text
    # The receiver's handler is registered database_only=True, and the page says so.
    assert saved["settings"]["database_only_handler"] is True
    assert "its handler registered `database_only=True`" in text
    assert "commit-to-send p50 < 10 ms" in text and "messages/s**" in text
    assert "receipt-to-processed p99 < 100 ms" in text and "events/s**" in text
    assert (tmp_path / "docs" / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_instruction_count_variants_run_and_switch_their_parts_off(pg_server, caplog):
    """Each variant of ``bench.instructions`` serves events (without valgrind here).

    What a variant switches off must really be off, or the parts' prices in
    docs/performance.md would be wrong: the log line, the metrics, the handler's SQL.
    """
    import logging

    from sqlalchemy import create_engine, text

    from bench import instructions
    from bench.load import event, sign
    from bench.run import SECRET
    from idemhook.testing import postgres

    url = instructions.prepare(pg_server)
    rendered = url.render_as_string(hide_password=False)
    engine = create_engine(url)

    def updates() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT sum(events) FROM bench_accounts")).scalar_one()

    def observed(variant: str) -> tuple[bool, bool]:
        """(logged, counted in /metrics) for one event through ``variant``."""
        app, path = instructions.build(rendered, variant)
        client = app.test_client()
        body = json.dumps(event(f"smoke-{variant}", 1)).encode()
        caplog.clear()  # records reach it through the root logger, at the variant's level
        answer = client.post(
            path,
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-Signature": sign(SECRET.encode(), body),
            },
        )
        assert answer.status_code == 200, answer.get_data(as_text=True)
        metrics = client.get("/metrics").get_data(as_text=True)
        counted = any(
            line.startswith("idemhook_events_total{")
            and 'outcome="processed"' in line
            and line.endswith(" 1.0")
            for line in metrics.splitlines()
        )
        return f"smoke-{variant}" in caplog.text, counted

    level = logging.getLogger("idemhook").level
    try:
        moved = {}
        for variant in instructions.VARIANTS:
            before = updates()
            instructions.run_child(rendered, variant, 3, toggle=False)
            moved[variant] = updates() - before
        served = 3 + instructions.WARMUP
        assert moved == {
            "baseline": served,
            "receiver": served,
            "no-log": served,
            "no-metrics": served,
            "no-handler-sql": 0,
            "intake-only": 0,
            "no-watchdog": served,
            "baseline-batch": served * instructions.BATCH,
            "receiver-batch": served * instructions.BATCH,
            "async-ack": 0,  # acknowledged only: idemhook worker runs the handler
            "receiver-fresh": served,  # every event newer than its account's last
            "baseline-api": served,  # a new key each: the operation runs
            "receiver-api": served,
            # Sent once as new, then measured again: the repeats run nothing (served, not
            # served + 3).
            "baseline-dup": served,
            "receiver-dup": served,
            "baseline-api-replay": served,
            "receiver-api-replay": served,
        }
        assert observed("receiver") == (True, True)
        assert observed("no-log") == (False, True)
        assert observed("no-metrics") == (True, False)
    finally:
        logging.getLogger("idemhook").setLevel(level)
        engine.dispose()
        postgres.drop_database(url)
