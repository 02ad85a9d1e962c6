"""Start a real gunicorn serving idemhook for tests that need real worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.engine import URL

ROOT = Path(__file__).resolve().parent.parent


def to_toml(config: Mapping[str, Any]) -> str:
    """Write the sources-file subset of TOML (strings, numbers, booleans, lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = [f"plugins = {value(config.get('plugins', []))}"]
    for name, table in config.get("sources", {}).items():
        lines.append(f"\n[sources.{json.dumps(name)}]")
        lines += [f"{key} = {value(v)}" for key, v in table.items()]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gunicorn(
    database_url: URL,
    config: Mapping[str, Any],
    tmp_path: Path,
    *,
    workers: int = 4,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Serve ``app:create_app()`` with ``workers`` sync workers; yield its base URL."""
    config_path = tmp_path / "webhooks.toml"
    config_path.write_text(to_toml(config))
    port = free_port()
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--config",
            "python:tests.gunicorn_test_conf",
            *args,
            "app:create_app()",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "IDEMHOOK_CONFIG": str(config_path),
            **(env or {}),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited: {(tmp_path / 'gunicorn.log').read_text()[-3000:]}"
                )
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not accepting yet, or workers still booting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not answer /healthz within 60 s")
            time.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
