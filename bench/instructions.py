"""Instructions per request, counted: ``python -m bench.instructions [--requests 200]``.

Runs each app's WSGI stack in a process under valgrind's callgrind and counts
the user-space instructions it executes per request, between two switches
made around the measured loop (``callgrind_control``). Unlike a timing, the
count is the same from one run to the next whatever else the machine is doing
(within about 0.5 %), so it shows what a change buys where wall-clock figures
on a shared two-core machine cannot. It counts the worker's own work only: not
the kernel's, not gunicorn's HTTP parsing, not PostgreSQL's.

Variants (``--variants``):

- ``baseline``: ``bench/baseline.py``.
- ``receiver``: the receiver, everything on (the event log line goes to /dev/null).
- ``no-log``: without the event log line.
- ``no-metrics``: without the metrics observers and request timer.
- ``no-handler-sql``: the handler returns its result without running its UPDATE.
- ``intake-only``: without logging and metrics, and a claim that does nothing:
  Flask, routing, verification, parsing and the answer.
- ``no-watchdog``: the claim runs on the request thread, without a handler deadline: what
  the HTTP bench's handler saves by being registered ``database_only=True``. Every variant
  here registers it without that flag (``BENCH_WATCHED_HANDLER=1``, set before the handler
  is imported), so the parts' prices stay comparable with the figures of before it.
- ``baseline-batch``, ``receiver-batch``: batches of 100 events (counted per event).
- ``async-ack``: the receiver's asynchronous source (``mode = "async"``): verify, claim
  as received, answer 202; no handler runs (``idemhook worker`` would run it).
- ``receiver-fresh``: the receiver's source with ``freshness`` set (``bench_fresh``):
  each event's object and version read, and checked in the claim's statement.
- ``baseline-api``, ``receiver-api``: an API request with a new ``Idempotency-Key`` (the
  baseline's bare minimum of a key; the receiver's ``bench_api`` and its operation).
- ``baseline-dup``, ``receiver-dup``, ``baseline-api-replay``, ``receiver-api-replay``: the
  same, each request one sent before (a duplicate event; a replayed key).

The differences between variants are the costs of the parts (docs/performance.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from typing import Any

# Before bench.handler is imported (by a variant's plugins): see ``no-watchdog`` above.
os.environ.setdefault("BENCH_WATCHED_HANDLER", "1")

from .load import event, keyed_body, new_ids, sign, sign_keyed  # noqa: E402
from .run import (  # noqa: E402
    ASYNC_SOURCE_TOML,
    FRESH_SOURCE_TOML,
    PATHS,
    RUN_SOURCES_TOML,
    SECRET,
    SOURCES_TOML,
)

VARIANTS = (
    "baseline",
    "receiver",
    "no-log",
    "no-metrics",
    "no-handler-sql",
    "intake-only",
    "no-watchdog",
    "baseline-batch",
    "receiver-batch",
    "async-ack",
    "receiver-fresh",
    "baseline-api",
    "receiver-api",
    "baseline-dup",
    "receiver-dup",
    "baseline-api-replay",
    "receiver-api-replay",
)
#: Variant suffixes that send again what was sent before (duplicates, replays).
REPEATS = ("-dup", "-replay")
#: Events per request of the ``-batch`` variants (their counts are per event).
BATCH = 100
WARMUP = 50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=2, metavar=("URL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        url, variant = args.child
        run_child(url, variant, args.requests, toggle=True)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    from idemhook.testing import postgres

    server, cluster = postgres.server_url()
    url = prepare(server)
    try:
        counts: dict[str, int] = {}
        for variant in args.variants.split(","):
            counts[variant] = count(url, variant, args.requests)
            unit = "event" if variant.endswith("-batch") else "request"
            print(f"{variant:>15}: {counts[variant]:>10,} instructions/{unit}", flush=True)
        for suffix in ("", "-batch"):
            if f"baseline{suffix}" in counts and f"receiver{suffix}" in counts:
                ratio = counts[f"receiver{suffix}"] / counts[f"baseline{suffix}"]
                print(f"receiver{suffix}/baseline{suffix}: {ratio:.2f}")
    finally:
        postgres.drop_database(url)
        if cluster is not None:
            cluster.destroy()
    return 0


def prepare(server: Any) -> Any:
    """A fresh database migrated by the real migrations, with the bench's table."""
    from .run import prepare_database

    return prepare_database(server, prefix="idemhook_instr")


def count(url: Any, variant: str, requests: int) -> int:
    """Instructions per request of ``variant`` (one process under callgrind)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.instructions",
            "--requests",
            str(requests),
            "--child",
            url.render_as_string(hide_password=False),
            variant,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{variant}: {done.stderr[-2000:]}")
        with open(out) as f:
            totals = re.search(r"^totals: (\d+)", f.read(), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"{variant}: callgrind wrote no totals")
    per = requests * BATCH if variant.endswith("-batch") else requests
    return int(totals.group(1)) // per


def run_child(url: str, variant: str, requests: int, *, toggle: bool) -> float:
    """Send ``requests`` fresh events through ``variant``; return CPU seconds per request.

    ``toggle``: switch callgrind's instrumentation on and off around the loop.
    """
    import time

    from werkzeug.test import EnvironBuilder

    repeats = variant.endswith(REPEATS)
    base = next((variant.removesuffix(s) for s in REPEATS if variant.endswith(s)), variant)
    flask_app, path = build(url, base)
    app = flask_app.wsgi_app  # its middleware included (the request timer)
    secret = SECRET.encode()
    size = BATCH if base.endswith("-batch") else 0

    def environs(n: int, start: int = 0, ids: list[str] | None = None) -> list[dict[str, Any]]:
        out = []
        for i, eid in enumerate(ids or new_ids(n), start=start):
            if base.endswith("-api"):
                body = keyed_body(eid)
                headers = {
                    "Content-Type": "application/json",
                    "X-Signature": sign_keyed(secret, eid, body),
                    "Idempotency-Key": eid,
                }
                builder = EnvironBuilder(path=path, method="POST", data=body, headers=headers)
                out.append(builder.get_environ())
                continue
            if size:
                ids = new_ids(size)
                document: Any = [event(bid, i * size + j) for j, bid in enumerate(ids)]
            else:
                document = event(eid, i)
            body = json.dumps(document, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json", "X-Signature": sign(secret, body)}
            builder = EnvironBuilder(path=path, method="POST", data=body, headers=headers)
            out.append(builder.get_environ())
        return out

    def send(batch: list[dict[str, Any]]) -> None:
        status: list[str] = []

        def start_response(line: str, headers: Any, exc_info: Any = None) -> None:
            status.append(line)

        for environ in batch:
            body = b"".join(app(environ, start_response))
            if not status[-1].startswith(("200", "201", "202")):
                raise RuntimeError(f"{variant}: {status[-1]} {body[:300]!r}")

    send(environs(WARMUP))
    if repeats:  # sent once as new, then measured as duplicates or replays
        ids = new_ids(requests)
        send(environs(requests, ids=ids))
        measured = environs(requests, ids=ids)
    else:
        # With freshness, each event must be newer than the warm-up's of its account.
        measured = environs(requests, start=WARMUP if variant == "receiver-fresh" else 0)
    # As gunicorn.conf.py's post_worker_init does: the objects made at start-up stay out
    # of garbage collection, so a count is not swayed by when a full collection falls.
    gc.freeze()
    if toggle:
        _instrument("on")
    started = time.process_time()
    send(measured)
    cpu = time.process_time() - started
    if toggle:
        _instrument("off")
    return cpu / requests


def _instrument(state: str) -> None:
    subprocess.run(
        ["callgrind_control", "--instr=" + state, str(os.getpid())],
        check=True,
        capture_output=True,
    )


def build(url: str, variant: str) -> tuple[Any, str]:
    """The Flask app and path of ``variant`` (see the module docstring)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if variant.startswith("baseline"):
        os.environ["BENCH_DSN"] = (
            f"host={parsed.host} port={parsed.port or 5432} "
            f"user={parsed.username} dbname={parsed.database}"
        )
        os.environ["BENCH_SECRET"] = SECRET
        from .baseline import create_app as create_baseline

        if variant == "baseline-api":
            return create_baseline(), PATHS[("baseline", "keyed")]
        suffix = "_batch" if variant.endswith("-batch") else ""
        return create_baseline(), "/webhooks/baseline" + suffix
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")

    from idemhook import create_app
    from idemhook._engine.claim import Outcome

    config = tomllib.loads(SOURCES_TOML)
    if variant == "async-ack":  # the asynchronous source and its handler, beside the others
        config = tomllib.loads(SOURCES_TOML + ASYNC_SOURCE_TOML)
        config["plugins"].append("bench.async_handler")
    if variant == "receiver-fresh":  # the source with freshness and its handler, beside them
        config = tomllib.loads(SOURCES_TOML + FRESH_SOURCE_TOML)
        config["plugins"].append("bench.fresh_handler")
    if variant == "receiver-api":  # everything the HTTP bench's receiver serves
        config = tomllib.loads(RUN_SOURCES_TOML)
    # As the HTTP bench's receiver: a direct connection, its statements prepared, unless
    # the environment says otherwise (IDEMHOOK_PREPARED_STATEMENTS=false: as text).
    prepared = os.environ.get("IDEMHOOK_PREPARED_STATEMENTS", "true").lower() != "false"
    app = create_app(
        {
            "DATABASE_URL": parsed,
            "IDEMHOOK_CONFIG": config,
            "IDEMHOOK_PREPARED_STATEMENTS": prepared,
        }
    )
    # Which secret verified each delivery is written by a thread about once a second (one
    # statement per secret): under valgrind a second spans a few dozen requests, not the
    # hundreds a worker serves, so its writes would be counted many times over. The
    # request's own part (a deque append) is counted.
    app.extensions["idemhook.receiver"].matches.flush_seconds = 3600.0
    idemhook_log = logging.getLogger("idemhook")  # to stderr: count() reads it from a pipe
    claimer = app.extensions["idemhook.receiver"].claimer
    quiet = variant in ("no-log", "intake-only")
    idemhook_log.setLevel(logging.WARNING if quiet else logging.INFO)
    if variant in ("no-metrics", "intake-only"):
        from idemhook._web.metrics import RequestTimer

        metrics = app.extensions["idemhook.metrics"]
        claimer.observers.remove(metrics.observe_event)
        claimer.timers.remove(metrics.observe_phase)
        if not isinstance(app.wsgi_app, RequestTimer):
            raise RuntimeError("the request timer is not the outermost middleware")
        app.wsgi_app = app.wsgi_app.wsgi_app  # type: ignore[method-assign]
    if variant == "no-handler-sql":
        registry = claimer.registry
        for i, registration in enumerate(registry.registrations):
            registry.registrations[i] = type(registration)(
                registration.source, registration.pattern, _no_sql
            )
        registry._cache.clear()
    if variant == "intake-only":
        claimer.apply = lambda events, body, versions=None, **_options: [
            Outcome(events[0].id, "processed", None)
        ]
    if variant == "no-watchdog":
        from idemhook._engine.watchdog import Job

        claimer.watchdog.run = lambda work, on_overrun: work(Job())

    if variant == "async-ack":
        return app, "/webhooks/bench_async"
    if variant == "receiver-api":
        return app, PATHS[("receiver", "keyed")]
    if variant == "receiver-fresh":
        return app, "/webhooks/bench_fresh"
    return app, "/webhooks/bench_batch" if variant.endswith("-batch") else "/webhooks/bench"


def _no_sql(event: Any, db: Any) -> dict[str, int]:
    return {"account": int(event.payload["account"])}


if __name__ == "__main__":
    sys.exit(main())
