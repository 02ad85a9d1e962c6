"""Profile one receiver worker under load: ``python -m bench.profile [--seconds 10] [--batch]``.

Starts the bench's database and servers with one worker, samples that worker with
py-spy while wrk sends fresh single events (or batches), and prints the functions
holding the most samples (inclusive) (collapsed stacks in bench/results/profile/).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from .load import drive, new_ids
from .run import PATHS, QUICK, RESULTS, Bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--batch", action="store_true", help="profile batches of 100")
    parser.add_argument("--server", default="receiver", choices=("receiver", "baseline"))
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--gil", action="store_true", help="only threads holding the GIL (CPU, not waits)"
    )
    args = parser.parse_args(argv)
    out = RESULTS / "profile"
    out.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    bench = Bench(replace(QUICK, gunicorn=("--workers", "1")), out)
    try:
        bench.setup()
        server = bench.servers[args.server]
        (worker,) = server.worker_pids()
        kind = "batch" if args.batch else "single"
        ids = new_ids(3000 * args.seconds * (100 if args.batch else 1))
        requests = bench._file("profile", ids, batch=100 if args.batch else 0)
        # Warm the worker first so that imports and first connections stay out of the profile.
        drive(
            bench.wrk, server.url + PATHS[(args.server, kind)], requests, seconds=1, connections=4
        )
        raw = out / f"{args.server}-{kind}.txt"
        spy = [py_spy, "record", "--pid", str(worker), "--duration", str(args.seconds)]
        if args.gil:
            spy.append("--gil")
        spy.append("--rate")
        jobs = [
            subprocess.Popen(
                [*spy, "250", "--format", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        load = threading.Thread(
            target=drive,
            args=(bench.wrk, server.url + PATHS[(args.server, kind)], requests),
            kwargs={"seconds": args.seconds + 1, "connections": 4},
        )
        load.start()
        for job in jobs:
            job.wait()
        load.join()
        print(summary(raw, args.top))
        print(f"\ncollapsed stacks: {raw}")
    finally:
        bench.teardown()
    return 0


def summary(raw: Path, top: int) -> str:
    """Inclusive sample share per function, from py-spy's collapsed-stack output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
            for f in stack.split(";")
        ]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples; inclusive share (own share)"]
    for frame, count in inclusive.most_common(top):
        lines.append(f"{100 * count / total:5.1f}% ({100 * own[frame] / total:4.1f}%)  {frame}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
