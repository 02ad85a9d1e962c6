"""A real PgBouncer in front of a test PostgreSQL server, started for a test and stopped after.

    with PgBouncer(server_url, pool_mode="transaction", default_pool_size=3) as bouncer:
        create_app({"DATABASE_URL": bouncer.url_for(database_url), ...})

PgBouncer is Debian's ``pgbouncer`` package (``make system-deps`` installs it,
:func:`ensure_pgbouncer`). Like PostgreSQL it refuses to run as root, so as
root it runs as the ``postgres`` user in a temporary directory that user owns
(the same arrangement as :class:`idemhook.testing.postgres.Cluster`).

Every database name a client asks for is forwarded to the same name on the
server (PgBouncer's ``*`` fallback database), so ``url_for(any_database_url)``
reaches that database through the pooler. Authentication is ``trust``: the
test servers trust local connections, and the pooler only needs to know the
user (its ``auth_file``).

Nothing here ever skips: a missing binary or a PgBouncer that does not start
raises :class:`NoPgBouncer` with the reason and the end of PgBouncer's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psycopg2
from sqlalchemy.engine import URL

#: Guard against a PgBouncer that hangs starting or stopping; never a performance bound.
START_TIMEOUT = 30.0

#: The admin console's listings the tests read.
_SHOW = {name: f"SHOW {name}" for name in ("POOLS", "CLIENTS", "SERVERS", "STATS")}

#: Where Debian's package puts the binary, for a PATH without the sbin directories.
_KNOWN_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


class NoPgBouncer(RuntimeError):
    """PgBouncer could not be found or started."""


def find_pgbouncer() -> str | None:
    """The pgbouncer binary, or None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for path in _KNOWN_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


def ensure_pgbouncer() -> str:
    """Return the pgbouncer binary, installing Debian's ``pgbouncer`` package when it is missing."""
    found = find_pgbouncer()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise NoPgBouncer(
            "pgbouncer is not installed: run `apt-get install -y pgbouncer` (Debian/Ubuntu)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "pgbouncer"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 and cmd[1] == "install":
            raise NoPgBouncer(f"apt-get install pgbouncer failed: {done.stderr.strip()[-500:]}")
    found = find_pgbouncer()
    if not found:
        raise NoPgBouncer("pgbouncer is still missing after apt-get install pgbouncer")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote(value: str) -> str:
    # auth_file syntax: "name" "password", a double quote doubled.
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """One PgBouncer process forwarding to ``server`` (a PostgreSQL server URL)."""

    def __init__(
        self,
        server: URL,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 3,
        settings: Mapping[str, str | int] | None = None,
        databases: Mapping[str, str] | None = None,
    ) -> None:
        """``settings``: more ``[pgbouncer]`` keys; ``databases``: more ``[databases]`` lines."""
        if pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(f"unknown pool_mode {pool_mode!r}")
        self.server = server
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.settings = dict(settings or {})
        self.databases = dict(databases or {})
        self.binary: str | None = None
        self.port = 0
        self.as_postgres = os.geteuid() == 0
        self.root: Path | None = None
        self.pid: int | None = None

    # -- where it listens ------------------------------------------------------------------

    def url_for(self, database_url: URL) -> URL:
        """``database_url`` (a database on the server) as reached through this PgBouncer."""
        return database_url.set(host="127.0.0.1", port=self.port)

    @property
    def admin_dsn(self) -> dict[str, object]:
        """psycopg2 ``connect()`` arguments for PgBouncer's admin console (``SHOW POOLS``)."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.server.username or "postgres",
            "dbname": "pgbouncer",
            "connect_timeout": 3,
        }

    def show(self, what: str) -> list[dict[str, object]]:
        """Rows of ``SHOW <what>`` on the admin console: ``POOLS``, ``CLIENTS`` or ``SERVERS``."""
        statement = _SHOW.get(what.upper())
        if statement is None:
            raise ValueError(f"SHOW {what!r}: expected one of {', '.join(_SHOW)}")
        conn = psycopg2.connect(**self.admin_dsn)
        conn.autocommit = True  # the console refuses transactions
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                names = [column.name for column in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    # -- lifecycle -------------------------------------------------------------------------

    def _directory(self) -> Path:
        if self.root is None:
            raise NoPgBouncer("this PgBouncer is not started")
        return self.root

    def _config(self) -> str:
        root = self._directory()
        server = self.server
        target = f"host={server.host or '127.0.0.1'} port={server.port or 5432}"
        lines = ["[databases]"]
        lines += [f"{name} = {value}" for name, value in self.databases.items()]
        lines.append(f"* = {target}")  # any other database: the same name on the server
        settings: dict[str, str | int] = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",  # TCP only: no socket file to clash with another run
            "auth_type": "trust",
            "auth_file": str(root / "userlist.txt"),
            "admin_users": server.username or "postgres",
            "pool_mode": self.pool_mode,
            "default_pool_size": self.default_pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": 1000,
            "logfile": str(root / "pgbouncer.log"),
            "pidfile": str(root / "pgbouncer.pid"),
            **self.settings,
        }
        lines.append("[pgbouncer]")
        lines += [f"{key} = {value}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    def start(self) -> PgBouncer:
        """Start PgBouncer and wait until it forwards a query to the server."""
        self.binary = find_pgbouncer()
        if self.binary is None:
            raise NoPgBouncer(
                "pgbouncer is not installed: run `make system-deps` "
                "(installs Debian's pgbouncer package) or `apt-get install -y pgbouncer`"
            )
        self.root = Path(tempfile.mkdtemp(prefix="idemhook-pgbouncer-"))
        self.port = _free_port()
        user = self.server.username or "postgres"
        (self.root / "userlist.txt").write_text(
            f"{_quote(user)} {_quote(self.server.password or '')}\n"
        )
        ini = self.root / "pgbouncer.ini"
        ini.write_text(self._config())
        if self.as_postgres:
            os.chmod(self.root, 0o700)
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        command = [self.binary, "-d", "-q", str(ini)]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root, check=False)
        if done.returncode != 0:
            self._fail(f"pgbouncer exited with {done.returncode}: {done.stderr.strip()}")
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        why = "no answer"
        while time.monotonic() < deadline:
            if self.pid is None:
                self.pid = self._read_pid()
            if self.pid is not None and not _alive(self.pid):
                self._fail("pgbouncer exited after starting")
            if self.pid is not None:
                try:
                    # A real round trip through the pooler to the server, not just a listening port.
                    conn = psycopg2.connect(
                        host="127.0.0.1",
                        port=self.port,
                        user=self.server.username or "postgres",
                        password=self.server.password,
                        dbname=self.server.database or "postgres",
                        connect_timeout=3,
                    )
                except psycopg2.OperationalError as exc:
                    why = str(exc).strip() or repr(exc)
                else:
                    try:
                        conn.autocommit = True
                        with conn.cursor() as cur:
                            cur.execute("SELECT 1")
                        return
                    finally:
                        conn.close()
            time.sleep(0.05)
        self._fail(f"pgbouncer did not forward a query within {START_TIMEOUT:.0f} s ({why})")

    def _read_pid(self) -> int | None:
        try:
            return int((self._directory() / "pgbouncer.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def log(self) -> str:
        """What PgBouncer wrote to its log so far."""
        if self.root is None:
            return ""
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _fail(self, reason: str) -> None:
        tail = self.log()[-2000:]
        self.stop()
        raise NoPgBouncer(f"{reason}\n{tail}")

    def stop(self) -> None:
        """Stop PgBouncer (its clients are disconnected) and remove its directory."""
        pid = self.pid if self.pid is not None else (self._read_pid() if self.root else None)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGTERM)  # immediate shutdown
            deadline = time.monotonic() + START_TIMEOUT
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pid = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a daemon's zombie, left to a container's init, counts as gone)."""
    if not Path("/proc/self/stat").exists():  # no procfs (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state follows the parenthesised command name, which may itself hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
