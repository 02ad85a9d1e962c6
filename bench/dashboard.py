"""The dashboard on a big table: ``python -m bench.dashboard [--rows N] [--docs]``.

Fills ``processed_events`` of a throwaway database with ``--rows`` synthetic
events (default 10 million, over the last 7 days: 4 sources, 6 types, 10 %
duplicated, 3 % ignored, 0.2 % rejected) and ``delivery_failures`` with 50,000
failures (a tenth of them unresolved), the way the bench prefills its table
(:func:`bench.run.fill`); then serves the shipped gunicorn on it and asks each
dashboard page ``--rounds`` times, logged in as a browser is. The figure is the
server's own time for the page (its ``Server-Timing`` header: from the request
reaching the app to the response leaving it, database included), the median
and the largest of the rounds after one warm-up request; the client's wall time
is recorded beside it.

``--docs`` writes the table into docs/performance.md and bench/performance.md.in,
between the ``dashboard`` markers (the rest of the page is ``make bench``'s). It
takes about ten minutes on the 2-core machine, mostly filling and indexing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2
import requests
from sqlalchemy.engine import make_url

from idemhook.testing import postgres
from tests.servers import ROOT, gunicorn

from .run import fill, human, log, prepare_database

TOKEN = "bench-dashboard-admin-token-0123456789"
SOURCES = {
    "plugins": [],
    "sources": {
        name: {
            "scheme": "hmac-sha256",
            "secret": "bench-secret-not-for-production",
            "event_id": "body:id",
            "event_type": "body:type",
        }
        for name in ("hubspot", "stripe", "shopify", "github")
    },
}
#: Rows ``start`` to ``stop`` of the series, newest first: one every 60 ms over 7 days at
#: 10 million rows.
FILL_SQL = """
INSERT INTO processed_events (source, event_id, event_type, status, received_at,
    processed_at, payload, result, duplicate_count, last_seen_at)
SELECT (ARRAY['hubspot', 'hubspot', 'stripe', 'shopify', 'github'])[g %% 5 + 1],
    md5(g::text),
    (ARRAY['contact.propertyChange', 'contact.creation', 'deal.won', 'invoice.paid',
        'order.created', 'push'])[g %% 6 + 1],
    CASE WHEN g %% 500 = 7 THEN 'rejected' WHEN g %% 33 = 5 THEN 'ignored'
        ELSE 'processed' END,
    now() - g * interval '60 ms', now() - g * interval '60 ms',
    jsonb_build_object('id', md5(g::text), 'type', 'contact.propertyChange',
        'account', g %% 10000 + 1, 'objectId', g, 'portalId', 62515),
    jsonb_build_object('account', g %% 10000 + 1),
    CASE WHEN g %% 10 = 3 THEN 1 ELSE 0 END, now() - g * interval '60 ms'
FROM generate_series(%(start)s, %(stop)s) AS g
"""
FAILURES_SQL = """
INSERT INTO delivery_failures (source, event_id, event_type, error, traceback, raw_body,
    payload, headers, permanent, failed_at)
SELECT 'hubspot', CASE WHEN g % 10 = 0 THEN 'unresolved_' || g ELSE md5((g * 5)::text) END,
    'contact.propertyChange', 'bench.handler:apply raised TimeoutError',
    'Traceback (most recent call last): ...', '\\x7b7d', '{}', '{}', false,
    now() - g * interval '12 s'
FROM generate_series(1, 50000) AS g
"""

PAGES = (
    ("overview", "/dashboard"),
    ("events, newest", "/dashboard/events"),
    ("events, second page", "{next}"),
    ("events by source and type", "/dashboard/events?source=stripe&type=deal.won"),
    ("events by type and status", "/dashboard/events?type=order.created&status=processed"),
    ("events by rare status", "/dashboard/events?status=rejected"),
    ("events 6 days back", "/dashboard/events?until=6d&source=hubspot"),
    ("search by event ID", "/dashboard/events?id={event_id}"),
    ("one event", "/dashboard/events/{source}/{event_id}"),
    ("replay confirmation", "/dashboard/replay/{source}/{event_id}"),
    ("unresolved failures", "/dashboard/failures"),
    ("all failures, one source", "/dashboard/failures?all=1&source=hubspot"),
    ("outbox (absent)", "/dashboard/outbox"),
)
BEGIN = "<!-- dashboard figures: written by python -m bench.dashboard --docs -->"
END = "<!-- end of dashboard figures -->"
TARGET_MS = 200.0


def _connect(url: Any) -> psycopg2.extensions.connection:
    return psycopg2.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database,
    )


def _server_ms(response: requests.Response) -> float:
    found = re.search(r"app;dur=([\d.]+)", response.headers.get("Server-Timing", ""))
    if not found:
        raise RuntimeError(f"no Server-Timing on {response.url}: {response.status_code}")
    return float(found.group(1))


def _log_in(base: str) -> requests.Session:
    session = requests.Session()
    session.headers["Accept"] = "text/html"
    form = session.get(f"{base}/dashboard/login", timeout=30)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    session.post(
        f"{base}/dashboard/login", data={"csrf_token": csrf, "token": TOKEN}, timeout=30
    )
    return session


def measure(base: str, sample: tuple[str, str], rounds: int) -> list[dict[str, Any]]:
    session = _log_in(base)
    first = session.get(f"{base}/dashboard/events", timeout=60).text
    next_url = re.search(r'<a rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    source, event_id = sample
    figures = []
    for label, template in PAGES:
        path = template.format(next=next_url, source=source, event_id=event_id)
        session.get(f"{base}{path}", timeout=60, allow_redirects=False)  # warm-up
        server, wall = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            response = session.get(f"{base}{path}", timeout=60, allow_redirects=False)
            wall.append((time.perf_counter() - started) * 1000)
            if response.status_code not in (200, 303):
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")
            server.append(_server_ms(response))
        figures.append(
            {
                "page": label,
                "path": path,
                "shown": template.replace("{next}", "/dashboard/events?cursor=…")
                .replace("{source}", "<source>")
                .replace("{event_id}", "<id>"),
                "status": response.status_code,
                "server_ms_median": round(statistics.median(server), 1),
                "server_ms_max": round(max(server), 1),
                "wall_ms_median": round(statistics.median(wall), 1),
            }
        )
        log(f"{label}: {figures[-1]['server_ms_median']} ms (max {figures[-1]['server_ms_max']})")
    return figures


def markdown(results: dict[str, Any]) -> str:
    rows = [
        f"Measured by `python -m bench.dashboard` on {results['date']}: "
        f"{human(results['rows'])} rows in `processed_events` (over the last 7 days), "
        f"{results['failures']:,} in `delivery_failures`; the shipped gunicorn; "
        f"median and largest server time (`Server-Timing`) of {results['rounds']} requests "
        f"per page after a warm-up, on {results['cores']} cores whose load average was "
        f"{results['loadavg'][0]} to {results['loadavg'][1]} meanwhile (the machine is "
        f"shared). Target: under {TARGET_MS:.0f} ms each.",
        "",
        "| page | server ms, median | server ms, max | client ms, median |",
        "| --- | ---: | ---: | ---: |",
    ]
    for f in results["pages"]:
        rows.append(
            f"| {f['page']}: `{f['shown']}` | {f['server_ms_median']} "
            f"| {f['server_ms_max']} | {f['wall_ms_median']} |"
        )
    worst = max(f["server_ms_median"] for f in results["pages"])
    met = "met" if worst < TARGET_MS else "**not met**"
    rows += ["", f"Slowest page (median): {worst} ms: the {TARGET_MS:.0f} ms target is {met}."]
    return "\n".join(rows)


def write_docs(results: dict[str, Any]) -> None:
    section = f"{BEGIN}\n{markdown(results)}\n{END}"
    for path in (ROOT / "bench" / "performance.md.in", ROOT / "docs" / "performance.md"):
        text = path.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise RuntimeError(f"{path} has no dashboard section (its markers)")
        path.write_text(pattern.sub(lambda _: section, text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dashboard")
    parser.add_argument("--docs", action="store_true", help="write the figures into the docs")
    parser.add_argument(
        "--keep", action="store_true", help="keep the filled database (development)"
    )
    parser.add_argument("--reuse", help="URL of a database a --keep run filled (development)")
    args = parser.parse_args(argv)
    cluster = None
    if args.reuse:
        url = make_url(args.reuse)
    else:
        server_url, cluster = postgres.server_url()
        url = prepare_database(server_url, prefix="idemhook_bench_dashboard")
    try:
        if not args.reuse:
            started = time.monotonic()
            fill(_connect(url), FILL_SQL, 0, args.rows)
            conn = _connect(url)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(FAILURES_SQL)
                cur.execute("VACUUM ANALYZE delivery_failures")
            conn.close()
            log(f"filled {args.rows:,} events in {time.monotonic() - started:.0f}s")
        conn = _connect(url)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT source, event_id FROM processed_events WHERE id = %s", (4242,))
            sample = cur.fetchone()
        conn.close()
        env = {"IDEMHOOK_ADMIN_TOKEN": TOKEN}
        with gunicorn(SOURCES, url, env=env) as server:
            load_start = os.getloadavg()[0]
            pages = measure(server.url, sample, args.rounds)
            load_end = os.getloadavg()[0]
    finally:
        if args.keep or args.reuse:
            log(f"kept {url.render_as_string(hide_password=False)}")
        else:
            postgres.drop_database(url)
        if cluster is not None:
            cluster.destroy()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "rows": args.rows,
        "failures": 50_000,
        "rounds": args.rounds,
        # The machine's 1-minute load average around the measurement (others share it).
        "loadavg": [round(load_start, 2), round(load_end, 2)],
        "cores": os.cpu_count(),
        "pages": pages,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    if args.docs:
        write_docs(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
