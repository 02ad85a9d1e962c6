"""The outbox scenario: two ``idemhook worker`` processes and a sender that does nothing.

- **latency** (first): ``rate`` messages/s, each committed in its own transaction
  through the same ``add_message`` a handler's ``event.outbox.add`` uses; for each,
  the time from just before its ``COMMIT`` is sent to the moment its sender is
  called (the sender notes ``time.time()``; one clock, one machine). Wake-ups come
  from LISTEN/NOTIFY: the fallback poll (``IDEMHOOK_WORKER_POLL_MS``) is set to 5 s
  so that it cannot be what delivers.
- **drain**: ``messages`` pending messages committed in one transaction (with its
  NOTIFY) while both workers wait; messages/s from that commit to the last
  ``sent_at``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from idemhook._engine.outbox import add_message
from tests.servers import start_worker

WORKERS = 2
FILL_SQL = """
INSERT INTO outbox_messages (kind, key, payload, status, attempts, next_attempt_at,
    created_at)
SELECT 'bench', 'drain-' || g, jsonb_build_object('n', g), 'pending', 0, now(), now()
FROM generate_series(1, :count) AS g;
SELECT pg_notify('idemhook_outbox', 'bench');
"""


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(db_url: URL, work: Path, *, messages: int, rate: float, seconds: float,
        log: Any) -> dict[str, Any]:
    """Run both parts; return their figures (``results["outbox"]``)."""
    config = work / "outbox.toml"
    config.write_text('plugins = ["bench.outbox_sender"]\n')
    sends = work / "outbox-sends.log"
    env = {"BENCH_OUTBOX_LOG": str(sends), "IDEMHOOK_WORKER_POLL_MS": "5000",
           "IDEMHOOK_WORKER_BATCH": "100", "PYTHONDONTWRITEBYTECODE": "1"}
    engine = create_engine(db_url)
    workers = [
        start_worker(config, db_url, env=env, log_path=work / f"outbox-worker-{n}.log")
        for n in range(WORKERS)
    ]
    try:
        for process in workers:
            process.wait_log("listening on")
        # The paced run first, on a table with no backlog behind it: right after a burst,
        # until autovacuum has run, every take walks past the burst's dead index entries.
        latency = _latency(engine, sends, rate, seconds, log)
        drain = _drain(engine, messages, log)
    finally:
        for process in workers:
            process.stop()
        engine.dispose()
    return {"workers": WORKERS, "drain": drain, "latency": latency}


def _wait_sent(engine: Any, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            sent = conn.execute(
                text("SELECT count(*) FROM outbox_messages WHERE status = 'sent'")
            ).scalar()
        if sent >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers sent {sent} of {count} outbox messages")
        time.sleep(0.1)  # polling, bounded by the deadline


def _drain(engine: Any, messages: int, log: Any) -> dict[str, Any]:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM outbox_messages"))
    with engine.begin() as conn:
        conn.execute(text(FILL_SQL), {"count": messages})
    with engine.connect() as conn:
        committed = conn.execute(text("SELECT clock_timestamp()")).scalar()
    _wait_sent(engine, messages, timeout=max(120.0, messages / 100))
    with engine.connect() as conn:
        last = conn.execute(text("SELECT max(sent_at) FROM outbox_messages")).scalar()
    seconds = max((last - committed).total_seconds(), 1e-3)
    result = {"messages": messages, "seconds": round(seconds, 3),
              "per_s": round(messages / seconds)}
    log(f"outbox drain: {messages} messages in {seconds:.2f} s, {result['per_s']} msgs/s "
        f"with {WORKERS} workers")
    return result


def _latency(engine: Any, sends: Path, rate: float, seconds: float, log: Any) -> dict[str, Any]:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM outbox_messages"))
    sends.write_text("")
    count = int(rate * seconds)
    committed: dict[str, float] = {}
    commits: list[float] = []
    start = time.monotonic() + 0.2
    with engine.connect() as conn:
        for n in range(count):
            pause = start + n / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing the offered load, not synchronising
            key = f"latency-{n}"
            conn.begin()
            add_message(conn, "bench", {"n": n}, key)
            committed[key] = time.time()
            conn.commit()
            commits.append((time.time() - committed[key]) * 1000)
    _wait_sent(engine, count, timeout=60.0)
    called = {}
    for line in sends.read_text().splitlines():
        key, at = line.split()
        called.setdefault(key, float(at))
    ms = [(called[key] - at) * 1000 for key, at in committed.items()]
    result = {
        "rate": rate,
        "messages": count,
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(_quantile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
        # How much of it the producer's own COMMIT took (its WAL flush), for comparison.
        "commit_p50_ms": round(statistics.median(commits), 2),
        "commit_p99_ms": round(_quantile(commits, 0.99), 2),
    }
    log(f"outbox latency at {rate:g} msgs/s: p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms (the COMMIT itself: p50 "
        f"{result['commit_p50_ms']} ms, p99 {result['commit_p99_ms']} ms)")
    return result
