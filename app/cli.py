"""The ``idemhook`` command: Flask's CLI with idemhook's commands attached.

Commands are registered on ``app.cli`` by :func:`init_app` so that tests reach
them through ``app.test_cli_runner()`` and the console script through
:class:`flask.cli.FlaskGroup`.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup, FlaskGroup

from . import migrate
from .schemes import Delivery

db_cli = AppGroup("db", help="Create and upgrade the database schema (Alembic).")


@db_cli.command("upgrade")
@click.argument("revision", default="heads")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    migrate.upgrade(current_app, revision)
    click.echo(f"database at {', '.join(sorted(migrate.current(current_app))) or 'base'}")


@db_cli.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ("base" removes every table)."""
    migrate.downgrade(current_app, revision)
    click.echo(f"database at {', '.join(sorted(migrate.current(current_app))) or 'base'}")


@db_cli.command("current")
def db_current() -> None:
    """Print the applied revision and whether it is the latest."""
    applied = migrate.current(current_app)
    heads = migrate.heads(current_app)
    state = "up to date" if applied == heads else f"behind (latest: {', '.join(sorted(heads))})"
    click.echo(f"{', '.join(sorted(applied)) or 'base'} ({state})")


@click.command("sign")
@click.argument("source")
@click.argument("payload", type=click.File("rb"), default="-")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="Base URL of the receiver.")
def sign_command(source: str, payload: click.utils.LazyFile, url: str) -> None:
    """Print a curl command that POSTs PAYLOAD (a JSON file, - for stdin) signed for SOURCE."""
    receiver = current_app.extensions["idemhook.receiver"]
    if source not in receiver.sources:
        raise click.BadParameter(f"no source named {source!r}", param_hint="SOURCE")
    src = receiver.sources[source]
    body = payload.read()
    target = f"{url.rstrip('/')}/webhooks/{source}"
    headers = {"Content-Type": src.content_types[0]}
    headers.update(src.scheme.sign(Delivery(body, method="POST", url=target)))
    parts = ["curl", "-sS", "-X", "POST", target]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", body.decode("utf-8")]
    click.echo(" ".join(shlex.quote(p) for p in parts))


def init_app(app: Flask) -> None:
    app.cli.add_command(db_cli)
    app.cli.add_command(sign_command)


def main() -> None:
    """Console script ``idemhook``."""
    # Like gunicorn and `python -m`, make plugin modules beside the sources file importable.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    os.environ.setdefault("FLASK_APP", "app:create_app")
    from . import create_app

    group = FlaskGroup(
        name="idemhook",
        create_app=lambda: create_app(),
        help="idemhook: webhook receiver. Commands read DATABASE_URL and IDEMHOOK_CONFIG.",
    )
    group.main(prog_name="idemhook")
