"""``idemhook db``: create and upgrade the schema (Alembic)."""

from __future__ import annotations

from collections.abc import Callable

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy.exc import DBAPIError

from idemhook._cli.common import migrations_only
from idemhook._store import migrate

db_cli = AppGroup("db", help="Create and upgrade the database schema (Alembic).")


@migrations_only
@db_cli.command("upgrade")
@click.argument("revision", default="heads")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: the latest).

    They run over IDEMHOOK_MIGRATION_DATABASE_URL when it is set (the direct URL
    of a database that DATABASE_URL reaches through a pooler), else DATABASE_URL.
    """
    _migrating(lambda: migrate.upgrade(current_app, revision))


@migrations_only
@db_cli.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ("base" removes every table)."""
    _migrating(lambda: migrate.downgrade(current_app, revision))


def _migrating(run: Callable[[], None]) -> None:
    key = (
        "IDEMHOOK_MIGRATION_DATABASE_URL"
        if current_app.config.get("IDEMHOOK_MIGRATION_DATABASE_URL")
        else "DATABASE_URL"
    )
    url = current_app.config[key]
    click.echo(f"migrating over {key} ({url.render_as_string(hide_password=True)})", err=True)
    try:
        run()
    except DBAPIError as exc:
        hint = (
            ""
            if key != "DATABASE_URL"
            else "; if DATABASE_URL goes through a pooler that cannot run migrations, set "
            "IDEMHOOK_MIGRATION_DATABASE_URL to the database's direct URL "
            "(docs/operations.md, 'Behind a connection pooler')"
        )
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        raise click.ClickException(
            f"migration failed: {type(exc.orig).__name__}: {first}{hint}"
        ) from None
    click.echo(f"database at {', '.join(sorted(migrate.current(current_app))) or 'base'}")


@migrations_only
@db_cli.command("current")
def db_current() -> None:
    """Print the applied revision and whether it is the latest."""
    applied = migrate.current(current_app)
    heads = migrate.heads(current_app)
    state = "up to date" if applied == heads else f"behind (latest: {', '.join(sorted(heads))})"
    click.echo(f"{', '.join(sorted(applied)) or 'base'} ({state})")
