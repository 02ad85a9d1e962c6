"""Worker CPU per request, in process: ``python -m bench.micro [--requests 3000]``.

Sends the same pre-signed requests through each app's WSGI stack in this process
(Flask's test client, no HTTP server, no load generator) and reports the CPU time
(``time.process_time``) per request. On a shared, noisy machine this isolates the
Python cost of one request, which is what the hot-path optimisations change.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from idemhook import create_app
from idemhook.testing import postgres

from .load import event, new_ids, sign
from .run import SECRET, SOURCES_TOML, prepare_database


def measure(client, path: str, bodies: list[tuple[bytes, str]]) -> float:
    started = time.process_time()
    for body, signature in bodies:
        resp = client.post(
            path, data=body, headers={"Content-Type": "application/json", "X-Signature": signature}
        )
        if resp.status_code != 200:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.get_data(as_text=True)}")
    return (time.process_time() - started) * 1000 / len(bodies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    server, cluster = postgres.server_url()
    url = prepare_database(server, prefix="idemhook_micro")
    try:
        import tomllib

        sources = tomllib.loads(SOURCES_TOML)
        receiver = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": sources})
        os.environ["BENCH_DSN"] = (
            f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
        )
        os.environ["BENCH_SECRET"] = SECRET
        from .baseline import create_app as create_baseline

        clients = {
            "receiver": (receiver.test_client(), "/webhooks/bench"),
            "baseline": (create_baseline().test_client(), "/webhooks/baseline"),
        }
        secret = SECRET.encode()
        results: dict[str, list[float]] = {name: [] for name in clients}
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for name, (client, path) in clients.items():
                bodies = []
                for i, eid in enumerate(new_ids(args.requests if rnd else 200)):
                    body = json.dumps(event(eid, i), separators=(",", ":")).encode()
                    bodies.append((body, sign(secret, body)))
                ms = measure(client, path, bodies)
                if rnd:
                    results[name].append(ms)
        for name, values in results.items():
            print(f"{name}: {min(values):.3f} ms CPU/request (min of {values})")
        best = {name: min(values) for name, values in results.items()}
        print(f"ratio baseline/receiver CPU: {best['baseline'] / best['receiver']:.3f}")
    finally:
        postgres.drop_database(url)
        if cluster is not None:
            cluster.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
