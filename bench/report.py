"""Write docs/performance.md and its plot from a results.json: ``python -m bench.report [FILE]``.

The page is ``bench/performance.md.in`` with the measured parts filled in, so the
prose (settings rationale, the optimisation log) lives beside the bench and the
numbers always come from a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .servers import ROOT

TEMPLATE = Path(__file__).resolve().parent / "performance.md.in"
DOCS = ROOT / "docs"


def table(results: dict[str, Any]) -> str:
    rows = [
        "| scenario | receiver req/s | baseline req/s | ratio | CPU-cost ratio "
        "| receiver p50 / p99 ms | baseline p50 / p99 ms "
        "| CPU ms/request, worker + database (receiver; baseline) "
        "| thread switches/request (receiver; baseline) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for sc in results["scenarios"].values():
        a, b = sc["median"]["receiver"], sc["median"]["baseline"]
        per = sc["events_per_request"]
        if per > 1:
            a_rate = f"{a['rps']:.0f} ({a['events_per_s']:.0f} events/s)"
            b_rate = f"{b['rps']:.0f} ({b['events_per_s']:.0f} events/s)"
        else:
            a_rate, b_rate = f"{a['rps']:.0f}", f"{b['rps']:.0f}"
        label = sc["label"]
        if sc.get("rates"):
            label += f" ({sc['rates']['receiver']} / {sc['rates']['baseline']} req/s offered)"
        elif sc["rate"]:
            label += f" ({sc['rate']} req/s offered)"
        rows.append(
            f"| {label} | {a_rate} | {b_rate} | {sc['ratio_rps']} | {sc.get('ratio_cpu')} "
            f"| {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} "
            f"| {cpu(a)}; {cpu(b)} | {switches(a)}; {switches(b)} |"
        )
    return "\n".join(rows)


def summary(results: dict[str, Any]) -> str:
    new = results["scenarios"]["new"]
    met = sum(check["met"] for check in results["targets"])
    return (
        f"In this run: all-new single events at {new['median']['receiver']['rps']:.0f} req/s "
        f"(receiver) against {new['median']['baseline']['rps']:.0f} (baseline), a ratio of "
        f"{new['ratio_rps']} (CPU-cost ratio {new['ratio_cpu']}); {met} of "
        f"{len(results['targets'])} targets met (see Targets)."
    )


def stolen(results: dict[str, Any]) -> str:
    """The share of the machine's CPU time the hypervisor gave to others, per run."""
    shares = sorted(
        run["steal_percent"]
        for sc in results["scenarios"].values()
        for runs in sc["runs"].values()
        for run in runs
        if run.get("steal_percent") is not None
    )
    if not shares:
        return "not recorded in this run"
    return (
        f"{shares[len(shares) // 2]:.1f} % of the machine's CPU time in the median run, at "
        f"most {shares[-1]:.1f} % (`/proc/stat`'s steal)"
    )


def wrk_share(results: dict[str, Any]) -> str:
    """How much CPU the load generator itself used, per run (it shares the machine)."""
    shares = sorted(
        run["wrk_cpu_s"] / run["seconds"]
        for sc in results["scenarios"].values()
        for runs in sc["runs"].values()
        for run in runs
        if run["seconds"]
    )
    if not shares:
        return "no runs"
    return (
        f"wrk used {shares[len(shares) // 2]:.0%} of one core in the median run "
        f"(at most {shares[-1]:.0%}) of the machine's {results['machine']['cores']}"
    )


def switches(median: dict[str, Any]) -> str:
    value = median.get("switches_per_request")
    return f"{value:.1f}" if value else "-"


def cpu(median: dict[str, Any]) -> str:
    return f"{median['cpu_ms_per_request']:.2f} + {median.get('db_cpu_ms_per_request', 0):.2f}"


def outbox_text(results: dict[str, Any]) -> str:
    """The outbox scenario (bench/outbox.py) in a paragraph."""
    found = results.get("outbox")
    if not found:
        return "(not run)"
    drain, latency = found["drain"], found["latency"]
    return (
        f"{found['workers']} `idemhook worker` processes and a sender that does nothing "
        f"(`bench/outbox.py`). **Drain:** {drain['messages']:,} messages committed in one "
        f"transaction were all sent {drain['seconds']} s after its commit: "
        f"**{drain['per_s']:,} messages/s**. **Commit-to-send latency** at "
        f"{latency['rate']:g} messages/s offered, each message in its own transaction "
        f"({latency['messages']:,} messages; LISTEN/NOTIFY, the fallback poll set to 5 s): "
        f"**p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms** (max "
        f"{latency['max_ms']} ms), measured from just before the producer's `COMMIT` is "
        f"sent to the sender's call; that `COMMIT` alone (its WAL flush) took p50 "
        f"{latency['commit_p50_ms']} ms, p99 {latency['commit_p99_ms']} ms of it."
    )


def async_text(results: dict[str, Any]) -> str:
    """The asynchronous scenarios (bench/asynchronous.py) in a paragraph."""
    found = results.get("async")
    ack = results["scenarios"].get("async_ack")
    if not found or not ack:
        return "(not run)"
    drain, latency = found["drain"], found["latency"]
    rec, base = ack["median"]["receiver"], ack["median"]["baseline"]
    return (
        f"**The ack path** (`async_ack`: the receiver's `mode = \"async\"` source verifies, "
        f"claims the event as `received` with its queue row and answers 202; no handler "
        f"runs) served {rec['rps']:.0f} req/s against the baseline's {base['rps']:.0f} "
        f"(which also runs the handler's UPDATE): **ratio {ack['ratio_rps']}** (per round "
        f"{ack['ratios_by_round']}), CPU-cost ratio {ack['ratio_cpu']}. **Drain:** "
        f"{found['workers']} `idemhook worker` processes applied {drain['events']:,} "
        f"received events committed in one transaction in {drain['seconds']} s: "
        f"**{drain['per_s']:,} events/s**, {drain['ratio']} x the synchronous receiver's "
        f"all-new {found['reference_events_per_s']:.0f} events/s of this run (the same "
        f"handler: one UPDATE of one row of 10,000). **Receipt-to-processed** (the claim's "
        f"commit to the commit of the handler's work, PostgreSQL's clock both times) with "
        f"the ack path paced at {latency['rate']} req/s{latency['capped']} "
        f"({latency['achieved_rps']:.0f} achieved; {latency['events']:,} events; "
        f"LISTEN/NOTIFY, the fallback poll set to 5 s): **p50 {latency['p50_ms']} ms, p99 "
        f"{latency['p99_ms']} ms** (max {latency['max_ms']} ms); the acks themselves "
        f"answered within p99 {latency['ack_p99_ms']:.1f} ms."
    )


def paced_own_text(results: dict[str, Any]) -> str:
    """The p99 with each server at the paced fraction of its own peak (not a target)."""
    sc = results["scenarios"].get("paced_own")
    if not sc:
        return (
            "(`paced_own`, the same p99 with each server at 70 % of its own peak, was not "
            "part of this run.)"
        )
    a, b = sc["median"]["receiver"]["p99_ms"], sc["median"]["baseline"]["p99_ms"]
    rounds = "; ".join(f"{x:.1f} vs {y:.1f}" for x, y in sc["p99_by_round"])
    return (
        f"**The same p99 at the same utilisation** (not a target): each server offered "
        f"{results['settings']['plan']['paced_fraction']:.0%} of its own peak, "
        f"{sc['rates']['receiver']} req/s to the receiver and {sc['rates']['baseline']} to "
        f"the baseline, the median of {len(sc['p99_by_round'])} rounds: **p99 {a:.1f} vs "
        f"{b:.1f} ms ({round(a / b, 3) if b else '-'} x)** (per round: {rounds}); p50 "
        f"{sc['median']['receiver']['p50_ms']:.1f} vs {sc['median']['baseline']['p50_ms']:.1f} "
        f"ms. The target's shared rate puts the baseline at about 0.7 r of its own peak, r "
        f"being the throughput ratio ([The p99 at 70 % of peak, measured again]"
        f"(#the-p99-at-70--of-peak-measured-again-issue-26) says why that matters)."
    )


def target_table(results: dict[str, Any]) -> str:
    rows = ["| target | measured | met |", "| --- | --- | --- |"]
    for check in results["targets"]:
        rows.append(
            f"| {check['target']} | {check['detail']} | {'yes' if check['met'] else '**no**'} |"
        )
    return "\n".join(rows)


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput (events/s) and p99 per scenario, receiver beside baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(results["scenarios"].values())
    labels = [s["label"].replace(", ", ",\n").replace(" (", "\n(") for s in scenarios]
    x = range(len(scenarios))
    width = 0.38
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    for offset, server, colour in (
        (-width / 2, "receiver", "#1f77b4"),
        (width / 2, "baseline", "#aaaaaa"),
    ):
        events = [s["median"][server]["events_per_s"] for s in scenarios]
        p99 = [s["median"][server]["p99_ms"] for s in scenarios]
        top.bar([i + offset for i in x], events, width, label=server, color=colour)
        bottom.bar([i + offset for i in x], p99, width, label=server, color=colour)
    top.set_ylabel("events/s (median)")
    top.set_title("idemhook receiver vs bare baseline, same gunicorn settings")
    top.legend()
    bottom.set_ylabel("p99 latency, ms (median, log scale)")
    bottom.set_yscale("log")
    bottom.axhline(25, color="#d62728", linewidth=0.8, linestyle="--")
    bottom.set_xticks(list(x))
    bottom.set_xticklabels(labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: dict[str, Any], docs: Path = DOCS) -> Path:
    """Render the page and the plot into ``docs`` and return the page's path."""
    docs.mkdir(parents=True, exist_ok=True)
    plot(results, docs / "performance.png")
    machine = results["machine"]
    settings = results["settings"]
    plan = settings["plan"]
    fields = {
        "machine": (
            f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; "
            f"{machine['os']}; Python {machine['python']}; {machine['postgresql']}; "
            f"{machine['wrk']}. Load average {fmt_load(results['loadavg_start'])} at the start, "
            f"{fmt_load(results['loadavg_end'])} at the end (other work shared the machine)."
        ),
        "settings": (
            (
                "**A noise check (`--baseline-twice`): a second baseline served in the "
                "receiver's place; no figure of this page is the receiver's.** "
                if plan.get("baseline_twice")
                else ""
            )
            + f"gunicorn.conf.py: `{settings['gunicorn_conf']}`; extra arguments for both: "
            f"`{' '.join(settings['gunicorn_args']) or '(none)'}`. The receiver's "
            f"`IDEMHOOK_PREPARED_STATEMENTS`: "
            f"`{str(settings.get('prepared_statements', False)).lower()}`; its handler "
            + (
                "registered `database_only=True`"
                if settings.get("database_only_handler")
                else "watched on a claim thread (registered without `database_only`)"
            )
            + f". wrk: 2 threads, "
            f"{plan['connections']} connections, {plan['seconds']:g} s per run, "
            f"{plan['rounds']} rounds in ABBA order"
            + (
                f" (the paced scenario: {plan['paced_rounds']} rounds of "
                f"{plan['paced_seconds']:g} s, each after a CHECKPOINT)"
                if "paced_rounds" in plan
                else ""
            )
            + f". Started {results['started']}, "
            f"took {results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}."
        ),
        "wrk": wrk_share(results),
        "stolen": stolen(results),
        "summary": summary(results),
        "table": table(results),
        "targets": target_table(results),
        "paced_own": paced_own_text(results),
        "outbox": outbox_text(results),
        "async": async_text(results),
        "rss": ", ".join(
            f"{s['events']:,} events: {max(s['rss_mb']):.1f} MB"
            for s in sparse(results["rss"]["samples"])
        ),
    }
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    page = docs / "performance.md"
    page.write_text(text)
    return page


def sparse(samples: list[Any], keep: int = 5) -> list[Any]:
    """At most ``keep`` samples, evenly spread, always the first and the last."""
    if len(samples) <= keep:
        return samples
    step = (len(samples) - 1) / (keep - 1)
    return [samples[round(i * step)] for i in range(keep)]


def fmt_load(load: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument(
        "results",
        type=Path,
        nargs="?",
        default=ROOT / "bench" / "results" / "full" / "results.json",
    )
    args = parser.parse_args(argv)
    from .run import finalise

    print(write(finalise(json.loads(args.results.read_text()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
