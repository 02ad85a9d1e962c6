"""``idemhook secrets``: tenants' secrets (``tenants = true``), kept encrypted in the database.

A secret's value goes in through an environment variable or standard input only (never an
argument, which ``ps`` and shell histories show) and never comes out: ``list`` shows each
secret's id, dates and how often it matched. ``rekey`` re-encrypts every stored secret with
the first key of ``IDEMHOOK_SECRETS_KEY`` (docs/operations.md, "Rotating secrets").
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime

import click
from flask import current_app

from idemhook._cli.common import (
    DatabaseGroup,
    database_only,
    emit_json_lines,
    emit_table,
    needs_sources,
)
from idemhook._config import secrets as secrets_config
from idemhook._config.sources import valid_tenant
from idemhook._store import source_secrets
from idemhook._store.database import get_db
from idemhook._values.durations import QueryError, parse_duration
from idemhook._values.errors import ConfigError

secrets_cli = DatabaseGroup(
    "secrets", help="Add, list, expire and remove tenants' secrets; rekey them all."
)

LIST_TABLE = ("id", "tenant", "created", "expires", "last_matched", "count")


class Duration(click.ParamType):
    """A duration as typed: ``7d``, ``24h``, ``15m``."""

    name = "duration"

    def convert(self, value, param, ctx):
        try:
            return parse_duration(str(value))
        except QueryError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def _tenant(tenant: str) -> str:
    if not valid_tenant(tenant):
        raise click.BadParameter(
            "a tenant's name is 1-64 letters, digits, '.', '_', '-' or '@'", param_hint="TENANT"
        )
    return tenant


def _stamp(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="seconds")


@needs_sources
@secrets_cli.command("add")
@click.argument("source")
@click.argument("tenant")
@click.option("--from-env", "from_env", metavar="NAME", help="Read the secret from this variable.")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the secret from standard input.")
@click.option("--expires", type=DURATION, help="Stop verifying after this long: 7d, 24h.")
def secrets_add(source: str, tenant: str, from_env, from_stdin: bool, expires) -> None:
    """Store a new secret of TENANT of SOURCE (encrypted); print its id.

    The value comes from --from-env NAME or --stdin, never the command line. The tenant's
    deliveries verify with it from the next one on, in every running process.
    """
    _tenant(tenant)
    if bool(from_env) == from_stdin:
        raise click.UsageError("give exactly one of --from-env NAME and --stdin")
    configured = current_app.extensions["idemhook.receiver"].sources.get(source)
    if configured is None:
        raise click.ClickException(f"no source named {source!r} is configured")
    if not configured.tenants:
        raise click.ClickException(
            f"source {source!r} has no tenants: set tenants = true in [sources.{source}]"
        )
    if from_env:
        secret = os.environ.get(from_env, "")
        where = f"environment variable {from_env}"
    else:
        secret = sys.stdin.readline()
        where = "standard input"
    secret = secret.strip()
    if not secret:
        raise click.ClickException(f"{where} holds no secret (empty or only whitespace)")
    try:
        configured.scheme.tenant_key(secret)  # refused as the source's own would be
        box = secrets_config.box_of(
            current_app.config["IDEMHOOK_SECRETS_KEY"], needed_by="`idemhook secrets add`"
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    assert box is not None
    now = datetime.now(UTC)
    secret_id = source_secrets.add(
        get_db().engine,
        source,
        tenant,
        box.encrypt(secret),
        created_at=now,
        expires_at=now + expires if expires is not None else None,
    )
    click.echo(secret_id)


@database_only
@secrets_cli.command("list")
@click.argument("source")
@click.argument("tenant", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def secrets_list(source: str, tenant: str | None, as_json: bool) -> None:
    """List the secrets of SOURCE's tenants (or TENANT's): never their values."""
    if tenant is not None:
        _tenant(tenant)
    rows = source_secrets.listing(get_db().engine, source, tenant)
    now = datetime.now(UTC)
    shown = [
        {
            "id": row["id"],
            "tenant": row["tenant"],
            "created": _stamp(row["created_at"]),
            "expires": _stamp(row["expires_at"]),
            "live": row["expires_at"] is None or row["expires_at"] > now,
            "last_matched": _stamp(row["last_matched_at"]),
            "count": row["matched_count"],
        }
        for row in rows
    ]
    if as_json:
        emit_json_lines(shown)
    elif not shown:
        whose = f"tenant {tenant!r} of source {source!r}" if tenant else f"source {source!r}"
        click.echo(f"No secrets are stored for {whose}.")
    else:
        for row in shown:
            if not row["live"]:
                row["expires"] = f"{row['expires']} (expired)"
        emit_table(shown, LIST_TABLE)


@database_only
@secrets_cli.command("expire")
@click.argument("source")
@click.argument("tenant")
@click.argument("secret_id", metavar="ID", type=click.IntRange(1))
@click.option("--in", "after", type=DURATION, help="Expire after this long (24h); default now.")
def secrets_expire(source: str, tenant: str, secret_id: int, after) -> None:
    """Make secret ID of TENANT stop verifying, now or after --in (a rotation's old secret)."""
    _tenant(tenant)
    when = datetime.now(UTC) + (after if after is not None else parse_duration("0s"))
    if not source_secrets.expire(get_db().engine, source, tenant, secret_id, when):
        raise click.ClickException(
            f"tenant {tenant!r} of source {source!r} has no secret {secret_id}"
        )
    click.echo(f"secret {secret_id} of {source}/{tenant} expires {_stamp(when)}")


@database_only
@secrets_cli.command("remove")
@click.argument("source")
@click.argument("tenant")
@click.argument("secret_id", metavar="ID", type=click.IntRange(1))
def secrets_remove(source: str, tenant: str, secret_id: int) -> None:
    """Delete secret ID of TENANT (a tenant with no secret left is unknown: 404)."""
    _tenant(tenant)
    if not source_secrets.remove(get_db().engine, source, tenant, secret_id):
        raise click.ClickException(
            f"tenant {tenant!r} of source {source!r} has no secret {secret_id}"
        )
    click.echo(f"removed secret {secret_id} of {source}/{tenant}")


@database_only
@secrets_cli.command("rekey")
def secrets_rekey() -> None:
    """Re-encrypt every stored secret with the first key of IDEMHOOK_SECRETS_KEY.

    Put the new key first and keep the old ones after it until this has run; then the
    old keys can be dropped.
    """
    try:
        box = secrets_config.box_of(
            current_app.config["IDEMHOOK_SECRETS_KEY"], needed_by="`idemhook secrets rekey`"
        )
        assert box is not None
        done = source_secrets.rewrite_all(get_db().engine, box.rotate)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"re-encrypted {done} secret(s) with the first key of IDEMHOOK_SECRETS_KEY")
