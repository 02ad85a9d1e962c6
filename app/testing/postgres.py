"""A real PostgreSQL for tests and benchmarks, found or started, never faked.

Order of preference:

1. ``TEST_DATABASE_URL`` (a server URL; each run creates its own database in it);
2. a server answering on 127.0.0.1:5432 as user ``postgres``;
3. a throwaway cluster started with this machine's ``initdb``/``pg_ctl``
   (found through ``pg_config --bindir`` or ``/usr/lib/postgresql/*/bin``),
   run as the ``postgres`` user when we are root, because PostgreSQL refuses root.

If none of these works, :func:`server_url` raises :class:`NoPostgres` with the
reasons: PostgreSQL tests are never silently skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg2
from psycopg2 import sql
from sqlalchemy.engine import URL, make_url

from idemhook._config.settings import normalise_database_url


class NoPostgres(RuntimeError):
    """No PostgreSQL could be reached or started."""


def reachable(url: URL) -> str | None:
    """None if we can connect to ``url``, else why not."""
    try:
        psycopg2.connect(**connect_args(url), connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    return None


def connect_args(url: URL) -> dict:
    args = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database or "postgres",
    }
    args.update(url.query)
    return {k: v for k, v in args.items() if v is not None}


def find_bindir() -> Path | None:
    """Directory holding initdb and pg_ctl, or None."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A throwaway PostgreSQL cluster in a temporary directory (stop() removes it)."""

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="idemhook-pg-"))
        self.datadir = self.root / "data"
        self.fsync = fsync
        if self.as_postgres:
            # The postgres user must own the directory; /tmp's own directory is fine.
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def url(self) -> URL:
        return make_url(f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=self.root)

    def init(self) -> Cluster:
        try:
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        except subprocess.CalledProcessError as exc:
            raise NoPostgres(f"initdb failed: {exc.stderr.strip()}") from None
        return self

    def start(self) -> Cluster:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            f"-c max_connections=200 -c fsync={'on' if self.fsync else 'off'}"
        )
        out = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if out.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise NoPostgres(f"pg_ctl start failed: {out.stderr.strip()} {tail}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-m",
            mode,
            "-w",
            "stop",
            check=False,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


LOCAL_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def server_url(
    *, allow_start: bool = True, local: str = LOCAL_SERVER
) -> tuple[URL, Cluster | None]:
    """A reachable PostgreSQL server URL, and the cluster we started for it (if any)."""
    reasons = []
    explicit = os.environ.get("TEST_DATABASE_URL")
    if explicit:
        url = normalise_database_url(explicit)
        why = reachable(url)
        if why is None:
            return url, None
        raise NoPostgres(f"TEST_DATABASE_URL is set but unreachable: {why}")
    local_url = make_url(local)
    why = reachable(local_url)
    if why is None:
        return local_url, None
    reasons.append(f"no server on {local_url.host}:{local_url.port} ({why})")
    if allow_start:
        bindir = find_bindir()
        if bindir is None:
            reasons.append("no initdb/pg_ctl (pg_config --bindir, /usr/lib/postgresql/*/bin)")
        else:
            cluster = Cluster(bindir)
            try:
                cluster.init().start()
            except NoPostgres as exc:
                cluster.destroy()
                reasons.append(str(exc))
            else:
                return cluster.url, cluster
    raise NoPostgres(
        "PostgreSQL is required for these tests and none could be found or started: "
        + "; ".join(reasons)
        + ". Set TEST_DATABASE_URL, start a server on 127.0.0.1:5432, or install PostgreSQL."
    )


def create_database(
    server: URL, prefix: str = "idemhook_test", *, template: URL | None = None
) -> URL:
    """Create a new database on ``server`` (empty, or a copy of ``template``); return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template.database))
    conn = psycopg2.connect(**connect_args(server))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()
    return server.set(database=name)


def drop_database(url: URL) -> None:
    conn = psycopg2.connect(**connect_args(url.set(database="postgres")))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(url.database)
                )
            )
    finally:
        conn.close()
