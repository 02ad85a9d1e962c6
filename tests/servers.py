"""Run the receiver under a real gunicorn for tests: ``with gunicorn(sources, url) as server``.

The server is the production entry point (``app:create_app()``) with the sources
written to a TOML file and settings passed through the environment, exactly as a
deployment configures it. ``server.url`` is the base URL, ``server.worker_pids()``
the live worker processes, ``server.log()`` everything gunicorn and the app wrote.

    with gunicorn(SOURCES, pg_url, workers=4) as server:
        requests.post(f"{server.url}/webhooks/acme", ...)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.engine import URL

ROOT = Path(__file__).resolve().parent.parent

#: Upper bound for start-up and shutdown; only a guard against hanging, never asserted.
START_TIMEOUT = 60.0


class ServerError(RuntimeError):
    """gunicorn did not start (the message carries its log)."""


class Server:
    """A running gunicorn master and its workers."""

    def __init__(self, process: subprocess.Popen, url: str, workers: int, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.workers = workers
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """PIDs of the master's live worker processes."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []

    def log(self) -> str:
        """Everything gunicorn and the app wrote to stderr/stdout so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until /healthz answers and every worker is running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            try:
                healthy = requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                healthy = False
            if healthy and len(self.worker_pids()) >= self.workers:
                return
            time.sleep(0.05)
        raise ServerError(f"gunicorn did not become ready:\n{self.log()}")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), then forcibly if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=START_TIMEOUT / 2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def toml(config: Mapping[str, Any]) -> str:
    """Render a sources dict (top-level ``plugins`` and ``[sources.<name>]`` tables) as TOML."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot render {v!r} as TOML")

    lines = [f"plugins = {value(list(config.get('plugins', [])))}"]
    for name, table in config.get("sources", {}).items():
        lines.append(f"\n[sources.{json.dumps(name)}]")
        lines.extend(f"{key} = {value(v)}" for key, v in table.items())
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gunicorn(
    sources: Mapping[str, Any],
    database_url: URL | str,
    *,
    workers: int = 4,
    env: Mapping[str, str] | None = None,
    config: str = "",
    args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """Serve ``app:create_app()`` with ``sources`` on ``database_url``; stop on exit.

    ``env`` adds settings (e.g. ``IDEMHOOK_STATEMENT_TIMEOUT_MS``); ``config`` is
    extra Python for the gunicorn config file (e.g. ``logconfig_dict``); ``args``
    extra command-line options.
    """
    if isinstance(database_url, URL):
        database_url = database_url.render_as_string(hide_password=False)
    with tempfile.TemporaryDirectory(prefix="idemhook-gunicorn-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "webhooks.toml").write_text(toml(sources))
        # An explicit config file, so the repository's gunicorn.conf.py (PORT, WEB_CONCURRENCY)
        # does not leak into tests.
        # No control socket: every gunicorn on the machine would share one default path.
        # (Older gunicorns ignore the unknown setting.)
        (tmpdir / "gunicorn_test.py").write_text("control_socket_disable = True\n" + config + "\n")
        log_path = tmpdir / "gunicorn.log"
        port = free_port()
        process_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "DATABASE_URL": database_url,
            "IDEMHOOK_CONFIG": str(tmpdir / "webhooks.toml"),
            **(env or {}),
        }
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(tmpdir / "gunicorn_test.py"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            "sync",
            "--timeout",
            "30",
            "--graceful-timeout",
            "5",
            "--chdir",
            str(ROOT),
            *args,
            "app:create_app()",
        ]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command, env=process_env, stdout=log_file, stderr=subprocess.STDOUT
            )
        server = Server(process, f"http://127.0.0.1:{port}", workers, log_path)
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()
