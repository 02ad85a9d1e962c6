"""Start real servers for tests and the bench: ``with gunicorn(sources, url) as server``.

Every gunicorn a test or the bench starts goes through :func:`start_gunicorn`,
which runs the repository's shipped ``gunicorn.conf.py`` (gthread,
``WEB_CONCURRENCY`` workers x ``WEB_THREADS`` threads), exactly as
``gunicorn 'idemhook:create_app()'`` from a clone does. A test varies a setting the
way a user would: through those environment variables (``workers=``,
``threads=``, ``env=``), command-line options (``args=``) or extra lines of
gunicorn configuration (``config=``), and says why in a comment.

:func:`gunicorn` serves the production entry point (``idemhook:create_app()``) with
the sources written to a TOML file and settings passed through the environment,
as a deployment configures it. ``server.url`` is the base URL,
``server.worker_pids()`` the live worker processes, ``server.settings`` what
gunicorn resolved (workers, threads, worker class), ``server.log()`` everything
gunicorn and the app wrote.

    with gunicorn(SOURCES, pg_url) as server:            # the shipped 2 x 4 gthread
        requests.post(f"{server.url}/webhooks/acme", ...)

:func:`launch` runs any other command that serves HTTP (the demo's
``scripts/demo.sh``, ``idemhook serve``) with the same readiness wait and shutdown.

:func:`worker` runs ``idemhook worker`` (the Procfile's ``worker:`` process) on the
same sources and settings, and waits until it listens for notifications:

    with gunicorn(SOURCES, pg_url) as server, worker(SOURCES, pg_url) as w:
        ...; w.kill()                                     # SIGKILL, as a crash would

This lives with the tests, not in the shipped test kit (``app/testing``): it runs
a clone's ``gunicorn.conf.py`` and the clone's test plugins; the bench, a tool of
the clone too, imports it from here.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.engine import URL

ROOT = Path(__file__).resolve().parent.parent
#: The settings the Procfile's web process runs with (whichever module holds their values).
SHIPPED_CONFIG = ROOT / "gunicorn.conf.py"

#: Upper bound for start-up and shutdown; only a guard against hanging, never asserted.
START_TIMEOUT = 60.0

#: What users set to size gunicorn; a developer's shell must not change what tests run.
SERVER_VARIABLES = ("WEB_CONCURRENCY", "WEB_THREADS", "PORT", "GUNICORN_CMD_ARGS")

#: The gunicorn configuration of one test server: the shipped file, then the test's lines.
CONFIG = '''\
"""gunicorn settings of one server started by tests/servers.py."""

# The shipped settings, exactly as `gunicorn 'idemhook:create_app()'` in a clone loads them.
exec(compile(open({shipped!r}).read(), {shipped!r}, "exec"))

# No control socket: every gunicorn on the machine would share its default path, and
# servers running side by side would take it from each other. (Older gunicorns ignore
# the unknown setting.)
control_socket_disable = True

# -- the test's own settings --
{config}
# -- end of the test's settings --

# Tell tests/servers.py what gunicorn resolved and which workers have loaded the app;
# the hooks run after any the lines above define.
import json as _json
import os as _os

_STATE = {state!r}
_on_starting = globals().get("on_starting")
_post_worker_init = globals().get("post_worker_init")


def on_starting(server):
    if _on_starting is not None:
        _on_starting(server)
    settings = {{
        "workers": server.cfg.workers,
        "threads": server.cfg.threads,
        "worker_class": server.cfg.worker_class_str,
        "preload_app": server.cfg.preload_app,
    }}
    with open(_os.path.join(_STATE, "settings.json"), "w") as out:
        out.write(_json.dumps(settings))


def post_worker_init(worker):
    if _post_worker_init is not None:
        _post_worker_init(worker)
    open(_os.path.join(_STATE, f"ready-{{_os.getpid()}}"), "w").close()
'''


class ServerError(RuntimeError):
    """The server did not start (the message carries its log)."""


class Server:
    """A running server process (a gunicorn master) and its workers."""

    def __init__(
        self, process: subprocess.Popen, url: str, log_path: Path, state: Path | None = None
    ) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path
        #: Where the hooks of a :func:`start_gunicorn` server report (None: another server).
        self.state = state

    @property
    def pid(self) -> int:
        return self.process.pid

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """What gunicorn resolved: ``workers``, ``threads``, ``worker_class``, ``preload_app``."""
        if self.state is None:
            raise ServerError("only a server started by start_gunicorn reports its settings")
        return json.loads((self.state / "settings.json").read_text())

    @property
    def workers(self) -> int:
        return int(self.settings["workers"])

    @property
    def threads(self) -> int:
        return int(self.settings["threads"])

    def worker_pids(self) -> list[int]:
        """PIDs of the master's live worker processes (not one that has exited)."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
        return sorted(pid for pid in pids if _alive(pid))

    def log(self) -> str:
        """Everything the server wrote to stderr/stdout so far."""
        return self.log_path.read_text(errors="replace")

    def ready_workers(self) -> list[int]:
        """Live workers that have loaded the app (their ``post_worker_init`` has run)."""
        if self.state is None:
            return self.worker_pids()
        return [pid for pid in self.worker_pids() if (self.state / f"ready-{pid}").exists()]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until /healthz answers and every worker has loaded the app.

        Called again after a worker was killed, it waits for gunicorn's replacement.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"the server exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                healthy = requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                healthy = False
            if healthy and self._all_workers_ready():
                return
            time.sleep(0.05)  # polling, bounded by the deadline
        raise ServerError(f"the server did not become ready:\n{self.log()}")

    def _all_workers_ready(self) -> bool:
        if self.state is None:
            return True  # not ours to inspect (the demo): answering is enough
        if not (self.state / "settings.json").exists():
            return False
        live = self.worker_pids()
        return len(live) == self.workers and self.ready_workers() == live

    def stop(self) -> None:
        """Stop gracefully (SIGTERM to the master), then kill everything if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=START_TIMEOUT / 2)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: workers too
                self.process.wait()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a killed worker stays a zombie until gunicorn reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pin_sessions(
    server: Server, per_worker: int, ask: Callable[[requests.Session], int]
) -> dict[int, list[requests.Session]]:
    """``per_worker`` kept-alive HTTP connections to each worker of ``server``.

    gunicorn's workers share one listening socket, so a new connection goes to
    whichever worker accepts it first; a kept-alive one stays with that worker.
    ``ask(session)`` sends a request on ``session`` and returns the pid of the
    worker that answered (a handler's answer says it: ``tests.plugins.whoami``).
    Close the sessions when done.
    """
    pinned: dict[int, list[requests.Session]] = {pid: [] for pid in server.worker_pids()}
    deadline = time.monotonic() + START_TIMEOUT
    while any(len(sessions) < per_worker for sessions in pinned.values()):
        if time.monotonic() > deadline:
            raise ServerError(f"could not reach every worker: {pinned}")
        session = requests.Session()
        sessions = pinned.get(ask(session))
        if sessions is not None and len(sessions) < per_worker:
            sessions.append(session)
        else:
            session.close()
    return pinned


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
        if isinstance(v, Mapping):  # an inline table (a source's clients)
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot render {v!r} as TOML")

    lines = [f"plugins = {value(list(config.get('plugins', [])))}"]
    for group in ("sources", "outbox"):
        for name, table in config.get(group, {}).items():
            lines.append(f"\n[{group}.{json.dumps(name)}]")
            lines.extend(f"{key} = {value(v)}" for key, v in table.items())
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    command: Sequence[str],
    *,
    url: str,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path = ROOT,
    state: Path | None = None,
) -> Server:
    """Start ``command`` in ``cwd`` with exactly ``env``, its own session, output to ``log_path``.

    It does not wait: call ``wait_ready()`` (``/healthz`` at ``url``), ``stop()`` at the end.
    """
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(process, url, log_path, state)


def start_gunicorn(
    app: str,
    *,
    state: Path,
    env: Mapping[str, str],
    config: str = "",
    args: Sequence[str] = (),
    port: int | None = None,
    log_path: Path | None = None,
) -> Server:
    """Start gunicorn serving ``app`` with the shipped settings; do not wait.

    ``state`` is a directory for the server's configuration file and reports;
    ``env`` its complete environment; ``config`` extra lines of gunicorn
    configuration (after the shipped ones); ``args`` extra command-line options.
    It listens on 127.0.0.1 only (the shipped ``bind`` is every interface, for a
    platform's router): a test server is nobody else's business.
    """
    port = port or free_port()
    config_path = state / "gunicorn_test.conf.py"
    config_path.write_text(
        CONFIG.format(shipped=str(SHIPPED_CONFIG), config=config, state=str(state))
    )
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        str(config_path),
        "--bind",
        f"127.0.0.1:{port}",
        *args,
        app,
    ]
    # The clone's packages (tests.plugins, bench) import in the master and every worker.
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return launch(
        command,
        url=f"http://127.0.0.1:{port}",
        env={**env, "PYTHONPATH": path},
        log_path=log_path or state / "gunicorn.log",
        state=state,
    )


def server_environment(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the server-sizing variables, plus ``settings``."""
    inherited = {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}
    return {**inherited, **(settings or {})}


@contextmanager
def gunicorn(
    sources: Mapping[str, Any],
    database_url: URL | str,
    *,
    workers: int | None = None,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    config: str = "",
    args: Sequence[str] = (),
) -> Iterator[Server]:
    """Serve ``idemhook:create_app()`` with ``sources`` on ``database_url``; stop on exit.

    By default the shipped ``gunicorn.conf.py`` decides everything (2 gthread
    workers x 4 threads today). ``workers``/``threads`` set ``WEB_CONCURRENCY``/
    ``WEB_THREADS``, as a user would; ``env`` adds settings (e.g.
    ``IDEMHOOK_STATEMENT_TIMEOUT_MS``); ``config`` is extra Python for the gunicorn
    config file (e.g. ``logconfig_dict``, a hook); ``args`` extra command-line options.
    """
    if isinstance(database_url, URL):
        database_url = database_url.render_as_string(hide_password=False)
    with tempfile.TemporaryDirectory(prefix="idemhook-gunicorn-") as tmp:
        state = Path(tmp)
        (state / "webhooks.toml").write_text(toml(sources))
        settings = {"DATABASE_URL": database_url, "IDEMHOOK_CONFIG": str(state / "webhooks.toml")}
        if workers is not None:
            settings["WEB_CONCURRENCY"] = str(workers)
        if threads is not None:
            settings["WEB_THREADS"] = str(threads)
        server = start_gunicorn(
            "idemhook:create_app()",
            state=state,
            env=server_environment({**settings, **(env or {})}),
            config=config,
            args=args,
        )
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()


class WorkerProcess:
    """A running ``idemhook worker``: ``pid``, ``log()``, ``stop()`` (SIGTERM), ``kill()``."""

    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until the worker's log holds ``needle`` (it exiting first is an error)."""
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if self.process.poll() is not None:
                code = self.process.returncode
                raise ServerError(f"the worker exited with {code}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise ServerError(f"the worker never logged {needle!r}:\n{self.log()}")
            time.sleep(0.02)  # polling, bounded by the deadline

    def stop(self) -> int:
        """SIGTERM, as a platform stops a process; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=START_TIMEOUT / 2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, whatever it holds."""
        self.process.kill()
        self.process.wait()


def start_worker(
    config_path: Path,
    database_url: URL | str,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    log_path: Path,
) -> WorkerProcess:
    """Start ``idemhook worker`` (the installed console script) with the sources at
    ``config_path``; do not wait."""
    if isinstance(database_url, URL):
        database_url = database_url.render_as_string(hide_password=False)
    settings = {"DATABASE_URL": database_url, "IDEMHOOK_CONFIG": str(config_path)}
    environment = server_environment({**settings, **(env or {})})
    path = os.pathsep.join(p for p in (str(ROOT), environment.get("PYTHONPATH", "")) if p)
    command = [str(Path(sys.executable).with_name("idemhook")), "worker", *args]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**environment, "PYTHONPATH": path},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProcess(process, log_path)


@contextmanager
def worker(
    sources: Mapping[str, Any],
    database_url: URL | str,
    *,
    count: int = 1,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    ready: str = "listening on",
) -> Iterator[Any]:
    """Run ``count`` ``idemhook worker`` processes on ``sources``; stop them (SIGTERM) on exit.

    Yields the one :class:`WorkerProcess` (or a list of ``count``), once each has
    logged ``ready`` (by default: its LISTEN is in place).
    """
    with tempfile.TemporaryDirectory(prefix="idemhook-worker-") as tmp:
        state = Path(tmp)
        config_path = state / "webhooks.toml"
        config_path.write_text(toml(sources))
        started = [
            start_worker(
                config_path, database_url, env=env, args=args, log_path=state / f"worker-{n}.log"
            )
            for n in range(count)
        ]
        try:
            for process in started:
                process.wait_log(ready)
            yield started[0] if count == 1 else started
        finally:
            for process in started:
                process.stop()
