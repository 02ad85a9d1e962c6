"""The ``idemhook`` console script before and around configuration.

From an empty directory with no environment, ``--help`` lists every command and
``--version`` prints idemhook's version; a command that needs the database or
the sources file says so in one line (exit 2). Read-only commands need only
``DATABASE_URL``: not the sources file's secrets.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from idemhook._cli import cli
from idemhook.testing import deliver

IDEMHOOK = str(Path(sys.executable).with_name("idemhook"))


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The console script with nothing but PATH and HOME (plus ``env``) in its environment."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd)}
    return subprocess.run(
        [IDEMHOOK, *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of ``group``, as argument tuples."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
    return paths


def test_help_without_configuration_lists_every_command(tmp_path: Path) -> None:
    done = run("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    listed = done.stdout.split("Commands:\n", 1)[1]
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert names == sorted(cli.commands)
    assert set(names) == {
        "db",
        "events",
        "failures",
        "handlers",
        "objects",
        "outbox",
        "reconcile",
        "rejections",
        "secrets",
        "send",
        "serve",
        "sign",
        "sources",
        "worker",
    }
    # Flask's own options and commands do not apply to idemhook.
    for flask_only in ("--app", "-A", "--debug", "--env-file", "routes", "shell"):
        assert flask_only not in done.stdout


def test_every_commands_help_works_without_configuration(tmp_path: Path) -> None:
    paths = command_paths(cli)
    assert ("failures", "show") in paths and ("events", "list") in paths
    for path in paths:
        done = run(*path, "--help", cwd=tmp_path)
        assert done.returncode == 0, (path, done.stderr)
        assert done.stdout.startswith(f"Usage: idemhook {' '.join(path)}"), path
        assert "Traceback" not in done.stderr


def test_version_is_the_packages(tmp_path: Path) -> None:
    done = run("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == f"idemhook {importlib.metadata.version('idemhook')}\n"


def test_a_command_without_database_url_says_so_in_one_line(tmp_path: Path) -> None:
    done = run("events", "list", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("Error: DATABASE_URL is not set")


def test_a_command_without_its_sources_file_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "event.json").write_text('{"id": "evt_1"}')
    done = run("sign", "demo", "event.json", cwd=tmp_path, env={"DATABASE_URL": "sqlite:///x.db"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"Error: `idemhook sign` needs the sources file: webhooks.toml does not exist in "
        f"{tmp_path} (set IDEMHOOK_CONFIG)"
    ]
    named = run(
        "send",
        "demo",
        "event.json",
        cwd=tmp_path,
        env={"DATABASE_URL": "sqlite:///x.db", "IDEMHOOK_CONFIG": "elsewhere.toml"},
    )
    assert named.returncode == 2
    assert len(named.stderr.splitlines()) == 1
    assert "elsewhere.toml does not exist" in named.stderr


@pytest.fixture
def unset_secret_config(tmp_path: Path, monkeypatch) -> Path:
    """A sources file whose source reads a secret from an unset environment variable."""
    config = tmp_path / "webhooks.toml"
    config.write_text(
        'plugins = ["tests.plugins.recorder"]\n\n'
        '[sources.acme]\nscheme = "hmac-sha256"\nsecret = "env:ACME_SECRET_NOT_SET"\n'
        'event_id = "body:id"\nevent_type = "body:type"\n'
    )
    monkeypatch.delenv("ACME_SECRET_NOT_SET", raising=False)
    return config


def test_read_only_commands_need_only_database_url(
    client, sql, db_url, unset_secret_config: Path
) -> None:
    # One real failure and one processed event to look at.
    sql("INSERT INTO test_failures VALUES ('evt_ro', 'CRM down')")
    assert deliver(client, "acme", {"id": "evt_ro", "type": "contact.created"}).status_code == 500
    sql("DELETE FROM test_failures")
    assert deliver(client, "acme", {"id": "evt_ro", "type": "contact.created"}).status_code == 200
    [(failure_id,)] = sql("SELECT id FROM delivery_failures")

    env = {
        "DATABASE_URL": db_url.render_as_string(hide_password=False),
        "IDEMHOOK_CONFIG": str(unset_secret_config),
    }
    cwd = unset_secret_config.parent
    for args in (
        ("events", "list"),
        ("events", "show", "acme", "evt_ro"),
        ("events", "stats"),
        ("failures", "list"),
        ("failures", "show", str(failure_id)),
    ):
        done = run(*args, cwd=cwd, env=env)
        assert done.returncode == 0, (args, done.stderr)
        assert "evt_ro" in done.stdout or args == ("events", "stats"), args
        assert "ACME_SECRET_NOT_SET" not in done.stderr

    # A command that runs handlers still needs every source: it says which secret is missing.
    replay = run("events", "replay", "acme", "evt_ro", "--force", cwd=cwd, env=env)
    assert replay.returncode == 2
    assert replay.stderr.splitlines() == [
        "Error: [sources.acme] secret: environment variable ACME_SECRET_NOT_SET is not set"
    ]
