"""The benchmark runs end to end in quick mode and reports every scenario and target.

It asserts that the bench works and reports, never a speed (that is `make bench`'s job).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench import report
from bench.run import QUICK, Bench

# The quick plan without its warm-up and with the shortest memory run: ~20 s in all.
SMOKE = replace(QUICK, warmup_seconds=0, rss_events=1)

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
        "duplicates",
        "dup10",
        "batch",
        "paced",
        *(f"rows_{n}" for n in SMOKE.prefill),
    }
    for name, scenario in saved["scenarios"].items():
        for server in ("receiver", "baseline"):
            median = scenario["median"][server]
            assert median["rps"] > 0, (name, server)
            assert median["p99_ms"] >= median["p50_ms"] > 0, (name, server)
        assert scenario["ratio_rps"] > 0
    assert saved["scenarios"]["batch"]["median"]["receiver"]["events_per_s"] > 0
    assert saved["rss"]["events"] >= SMOKE.rss_events
    assert all(size > 0 for size in saved["rss"]["samples"][-1]["rss_mb"])
    assert len(results["targets"]) == 6
    assert all(isinstance(check["met"], bool) for check in results["targets"])

    page = report.write(saved, docs=tmp_path / "docs")
    text = page.read_text()
    assert "{{" not in text
    assert "| all new events |" in text
    assert (tmp_path / "docs" / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
