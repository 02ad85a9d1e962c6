"""``idemhook db``: create and upgrade the schema (Alembic)."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup

from .. import migrate

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
