"""The asynchronous scenarios' second half: two ``idemhook worker`` processes apply events.

(The first half, ``async_ack``, is an ordinary A/B scenario of bench/run.py: the
receiver's ``bench_async`` source, which only verifies, claims and answers, against
the baseline's whole request.)

- **drain**: ``events`` received events of ``bench_async`` (with their queue rows)
  committed in one transaction with its NOTIFY while both workers wait; events/s
  from that commit to the last ``processed_at`` (each batch's commit). The handler
  is the bench's own (``bench/handler.py``: one UPDATE of one row of 10,000), the
  same the synchronous receiver runs; the figure is compared with the receiver's
  all-new events/s in the same run (``reference``).
- **latency**: the ack path at half load, paced by wrk, with both workers applying as
  the events arrive; for each event, ``processed_at - received_at`` (the claim's commit
  to the commit of its handler's work: PostgreSQL's clock both times). The fallback
  poll is set to 5 s, so only NOTIFY wakes them. Half load is half of what the machine
  can ack *and* apply per second (:func:`half_load`): the ack path and the workers share
  its two cores with PostgreSQL and wrk, so an event costs the CPU of its ack plus that
  of its apply, and together they serve ``1 / (1 / ack peak + 1 / drain rate)`` events/s,
  each figure measured alone in this run. (The rule before, half the drain rate or half
  the ack peak where that was lower, offered 836 events/s when the two together served
  about 860: a measure of a saturated machine, whose web tier fell behind wrk's pace.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.servers import start_worker

WORKERS = 2
SOURCE = "bench_async"
FILL_SQL = f"""
WITH claimed AS (
    INSERT INTO processed_events (source, event_id, event_type, status, received_at,
        payload, headers, duplicate_count, last_seen_at)
    SELECT '{SOURCE}', md5('drain' || g || clock_timestamp()), 'contact.propertyChange',
        'received', now(), jsonb_build_object('id', md5('drain' || g), 'type',
        'contact.propertyChange', 'account', g % 10000 + 1, 'objectId', g), '{{}}', 0, now()
    FROM generate_series(1, :count) AS g
    RETURNING id, received_at)
INSERT INTO event_queue (id, source, next_attempt_at, received_at)
SELECT id, '{SOURCE}', received_at, received_at FROM claimed;
SELECT pg_notify('idemhook_events', '');
"""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    db_url: URL,
    work: Path,
    config: Path,
    *,
    events: int,
    reference: float,
    pace: Callable[[float], dict[str, Any]],
    ack_peak: float | None,
    log: Any,
) -> dict[str, Any]:
    """Drain, then latency; ``pace(rate)`` drives the ack path at ``rate`` req/s (wrk)."""
    env = {"IDEMHOOK_WORKER_POLL_MS": "5000", "PYTHONDONTWRITEBYTECODE": "1"}
    engine = create_engine(db_url)
    _empty(engine)
    workers = [
        start_worker(config, db_url, env=env, log_path=work / f"async-worker-{n}.log")
        for n in range(WORKERS)
    ]
    try:
        for process in workers:
            process.wait_log("listening on")
        drain = _drain(engine, events, reference, log)
        rate = half_load(drain["per_s"], ack_peak)
        latency = _latency(engine, pace, rate, log)
        latency["half_drain_rate"] = round(drain["per_s"] / 2)
        latency["capped"] = (
            f"; half of what the ack path ({ack_peak:.0f} req/s alone) and the workers "
            f"({drain['per_s']:.0f} events/s alone) serve together"
            if ack_peak
            else "; half the drain rate (the ack path's peak was not measured)"
        )
    finally:
        for process in workers:
            process.stop()
        _empty(engine)
        engine.dispose()
    return {"workers": WORKERS, "reference_events_per_s": reference, "drain": drain,
            "latency": latency}


def forget(db_url: URL) -> None:
    """Delete ``bench_async``'s events and the queue (between scenarios)."""
    engine = create_engine(db_url)
    try:
        _empty(engine)
    finally:
        engine.dispose()


def _empty(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM event_queue"))
        conn.execute(text("DELETE FROM processed_events WHERE source = :s"), {"s": SOURCE})


def _wait_drained(engine: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            left = conn.execute(text("SELECT count(*) FROM event_queue")).scalar()
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers left {left} events unapplied")
        time.sleep(0.05)  # polling, bounded by the deadline


def _drain(engine: Any, events: int, reference: float, log: Any) -> dict[str, Any]:
    with engine.begin() as conn:
        conn.execute(text(FILL_SQL), {"count": events})
    with engine.connect() as conn:
        committed = conn.execute(text("SELECT clock_timestamp()")).scalar()
    _wait_drained(engine, timeout=max(120.0, events / 100))
    with engine.connect() as conn:
        last, applied = conn.execute(
            text(
                "SELECT max(processed_at), count(*) FROM processed_events "
                "WHERE source = :s AND status = 'processed'"
            ),
            {"s": SOURCE},
        ).one()
    if applied != events:
        raise RuntimeError(f"{applied} of {events} drained events were processed")
    seconds = max((last - committed).total_seconds(), 1e-3)
    per_s = round(events / seconds)
    result = {
        "events": events,
        "seconds": round(seconds, 3),
        "per_s": per_s,
        "ratio": round(per_s / reference, 3) if reference else None,
    }
    log(f"async drain: {events} events in {seconds:.2f} s, {per_s} events/s with {WORKERS} "
        f"workers ({result['ratio']} x the synchronous receiver's {reference:.0f})")
    _empty(engine)
    return result


def half_load(drain_per_s: float, ack_peak: float | None) -> float:
    """Half of the events/s the machine can both ack and apply (the ack peak and the drain
    rate each measured alone, on the same cores): half the drain rate without an ack peak."""
    if not ack_peak:
        return drain_per_s / 2
    return 0.5 / (1 / drain_per_s + 1 / ack_peak)


def _latency(engine: Any, pace: Callable[[float], dict[str, Any]], rate: float,
             log: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        since: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar()
    run = pace(rate)
    _wait_drained(engine, timeout=120.0)
    with engine.connect() as conn:
        delays = [
            float(row[0]) * 1000
            for row in conn.execute(
                text(
                    "SELECT EXTRACT(EPOCH FROM processed_at - received_at) FROM processed_events "
                    "WHERE source = :s AND received_at >= :since AND status = 'processed'"
                ),
                {"s": SOURCE, "since": since},
            )
        ]
    if not delays:
        raise RuntimeError("no event of the paced run was processed")
    result = {
        "rate": round(rate),
        "achieved_rps": run["rps"],
        "events": len(delays),
        "p50_ms": round(statistics.median(delays), 2),
        "p99_ms": round(quantile(delays, 0.99), 2),
        "max_ms": round(max(delays), 2),
        "ack_p99_ms": run["p99_ms"],
    }
    log(f"async receipt-to-processed at {rate:.0f} events/s offered ({run['rps']:.0f} achieved): "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
        f"(the ack itself: p99 {run['p99_ms']:.1f} ms)")
    return result
