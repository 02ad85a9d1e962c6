"""Pre-signed request files and the wrk driver (Debian's wrk package, installed if missing)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import resource
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LUA = Path(__file__).resolve().parent / "wrk.lua"
THREADS = 2


class BenchError(RuntimeError):
    """The bench could not run (no wrk, a server did not start, a run went wrong)."""


def ensure_wrk() -> str:
    """Return the wrk binary, installing Debian's ``wrk`` package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise BenchError("wrk is not installed: run `apt-get install -y wrk` (Debian/Ubuntu)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "wrk"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 and cmd[1] == "install":
            raise BenchError(f"apt-get install wrk failed: {done.stderr.strip()[-500:]}")
    found = shutil.which("wrk")
    if not found:
        raise BenchError("wrk is still missing after apt-get install wrk")
    return found


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def event(event_id: str, n: int) -> dict[str, Any]:
    """One webhook event shaped like a CRM's (HubSpot-like fields, ~250 bytes)."""
    return {
        "id": event_id,
        "type": "contact.propertyChange",
        "account": n % 10_000 + 1,
        "occurredAt": 1764300000000 + n,
        "subscriptionType": "contact.propertyChange",
        "propertyName": "lifecyclestage",
        "propertyValue": "customer",
        "objectId": 100_000 + n,
        "portalId": 62515,
        "attemptNumber": 0,
    }


def key_event(key: str) -> dict[str, Any]:
    """The body of an idempotency-key request: the same for every request with ``key``."""
    return event(key, int(key[:8], 16))


def keyed_body(key: str) -> bytes:
    return json.dumps(key_event(key), separators=(",", ":")).encode()


def sign_keyed(secret: bytes, key: str, body: bytes) -> str:
    """The ``idempotency-key`` scheme's HMAC: over the key, ``.``, and the body."""
    return sign(secret, key.encode() + b"." + body)


def new_ids(count: int) -> list[str]:
    """Distinct event IDs, random like real providers' (B-tree inserts land anywhere)."""
    return [uuid.uuid4().hex for _ in range(count)]


def write_requests(
    path: Path,
    secret: bytes,
    ids: list[str],
    *,
    batch: int = 0,
    start: int = 0,
    keyed: bool = False,
) -> int:
    """Write one pre-signed request per line ("<signature>\\t<body>"); return the line count.

    ``keyed``: requests of an ``idempotency-key`` source, each ID its ``Idempotency-Key``
    ("<signature>\\t<body>\\t<key>"), its body the same whenever the key is.
    """
    lines = []
    if keyed:
        for key in ids:
            body = keyed_body(key)
            lines.append(f"{sign_keyed(secret, key, body)}\t{body.decode()}\t{key}")
    elif batch:
        for i in range(0, len(ids) - batch + 1, batch):
            items = [event(eid, start + i + j) for j, eid in enumerate(ids[i : i + batch])]
            body = json.dumps(items, separators=(",", ":")).encode()
            lines.append(f"{sign(secret, body)}\t{body.decode()}")
    else:
        for i, eid in enumerate(ids):
            body = json.dumps(event(eid, start + i), separators=(",", ":")).encode()
            lines.append(f"{sign(secret, body)}\t{body.decode()}")
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


@dataclass
class Run:
    """One wrk run against one server."""

    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    wrapped: int
    wrk_cpu_s: float
    #: Latency histogram: microseconds -> requests (wrk's buckets), for pooling runs.
    histogram: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if k != "histogram"}
        return {**fields, "rps": round(self.rps, 1)}


def percentile_ms(histogram: dict[int, int], percent: float) -> float:
    """The ``percent`` percentile of a latency histogram (microseconds -> count), in ms.

    wrk's own rule: the smallest latency with at least ``percent`` % of the requests at or
    below it.
    """
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = max(1, round(percent / 100 * total + 0.5))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value / 1000
    return max(histogram) / 1000


def drive(
    wrk: str,
    url: str,
    requests_file: Path,
    *,
    seconds: float,
    connections: int,
    rate: float = 0,
) -> Run:
    """Run wrk for ``seconds`` (flat out, or at ``rate`` requests/s in total)."""
    cmd = [
        wrk,
        f"-t{THREADS}",
        f"-c{max(connections, THREADS)}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        str(requests_file),
        str(THREADS),
        str(rate / THREADS if rate else 0),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()} {done.stdout}")
    data = json.loads(line[len("BENCH_JSON ") :])
    hist = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_HIST")), "")
    histogram = {}
    for bucket in hist[len("BENCH_HIST") :].split():
        value, count = bucket.split(":")
        histogram[int(value)] = int(count)
    lat = data["latency_us"]
    return Run(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"],
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        wrapped=data["wrapped"],
        wrk_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        histogram=histogram,
    )
