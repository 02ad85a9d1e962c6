"""``idemhook handlers``: which handler runs for which source and event type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from idemhook._cli.common import no_database

handlers_cli = AppGroup("handlers", help="Inspect the registered event handlers and senders.")


@no_database
@handlers_cli.command("list")
def handlers_list() -> None:
    """Print every source, type pattern and handler (module:function), in run order, then
    each outbox kind's sender and retry policy, plugin migrations and plugin routes."""
    registry = current_app.extensions["idemhook.registry"]
    rows = [("SOURCE", "TYPE", "HANDLER")]
    rows += [(r.source, r.pattern, r.name + _flags(r)) for r in registry.registrations]
    if len(rows) == 1:
        click.echo(
            "no handlers registered: list plugin modules in `plugins` in the sources file "
            "or install a package with an idemhook.handlers entry point"
        )
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        for source, pattern, name in rows:
            click.echo(f"{source:<{widths[0]}}  {pattern:<{widths[1]}}  {name}")
    for kind, found in sorted(registry.senders.items()):
        click.echo(
            f"outbox sender: {kind}  {found.name}  (max_attempts {found.max_attempts}, "
            f"lease {found.lease_seconds:g} s, backoff {found.backoff_seconds:g}-"
            f"{found.max_backoff_seconds:g} s)"
        )
    for folder in registry.migrations:
        click.echo(f"plugin migrations: {_shown(folder)}")
    prefixes = tuple(f"{blueprint.name}." for blueprint, _where in registry.blueprints)
    for rule in current_app.url_map.iter_rules() if prefixes else ():
        if rule.endpoint.startswith(prefixes):
            methods = ", ".join(sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}))
            click.echo(f"plugin route: {methods} {rule.rule}  {rule.endpoint}")


def _shown(folder: Path) -> str:
    """The folder relative to the working directory when it is inside it."""
    try:
        return str(folder.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def _flags(registration: Any) -> str:
    """What a handler's registration says beyond its source and type."""
    flags = ""
    if registration.stale:
        flags += "  (stale=True: sees stale events too)"
    if registration.database_only:
        flags += "  (database_only=True: runs without the claim thread's watch)"
    return flags
