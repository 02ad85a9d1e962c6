"""The ``idemhook`` command: one module per command group in this package.

:func:`init_app` registers the commands on ``idemhook._cli``, so tests reach them
through ``app.test_cli_runner()``. The console script (:func:`main`) is a plain
click group holding the same commands, so ``--help`` and every command's
``--help`` work before anything is configured; a command builds the app only
when it runs, and only what it needs (:mod:`.common`: ``database_only``,
``needs_sources``).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import click
from flask import Flask
from flask.cli import ScriptInfo
from idemhook._cli.common import NEEDS_ATTRIBUTE, ConfigMissing
from idemhook._cli.db import db_cli
from idemhook._cli.events import events_cli
from idemhook._cli.failures import failures_cli
from idemhook._cli.handlers import handlers_cli
from idemhook._cli.outbox import outbox_cli
from idemhook._cli.send import send_command
from idemhook._cli.serve import serve_command
from idemhook._cli.sign import sign_command
from idemhook._cli.sources import sources_cli
from idemhook._cli.worker import worker_command
from idemhook._config import settings
from idemhook._store.database import APPLICATION_NAMES
from idemhook._values.errors import ConfigError

COMMANDS = (
    db_cli,
    serve_command,
    sign_command,
    sources_cli,
    handlers_cli,
    send_command,
    events_cli,
    failures_cli,
    outbox_cli,
    worker_command,
)


def init_app(app: Flask) -> None:
    for command in COMMANDS:
        app.cli.add_command(command)


def _version() -> str:
    try:
        return importlib.metadata.version("idemhook")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


@click.group(
    "idemhook",
    commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(_version(), "--version", prog_name="idemhook", message="%(prog)s %(version)s")
def cli() -> None:
    """idemhook: a webhook receiver that makes provider retries harmless.

    Commands read DATABASE_URL and IDEMHOOK_CONFIG (the sources file, default
    ./webhooks.toml); the read-only ones (events list/show/stats, failures
    list/show, outbox) need only DATABASE_URL. Exit status 2 means a usage or
    configuration problem, said in one line.
    """


def _create_app() -> Flask:
    """Build the app for the command being run, as much of it as that command needs."""
    from idemhook import create_app

    ctx = click.get_current_context(silent=True)
    needs = getattr(ctx.command, NEEDS_ATTRIBUTE, None) if ctx is not None else None
    what = f"`{ctx.command_path}`" if ctx is not None else "this command"
    # Each process says what it is in pg_stat_activity (unless the operator named it).
    role = "worker" if ctx is not None and ctx.command.name == "worker" else "cli"
    named = None
    if not os.environ.get("IDEMHOOK_APPLICATION_NAME"):
        named = {"IDEMHOOK_APPLICATION_NAME": APPLICATION_NAMES[role]}
    try:
        if needs == "database":
            return create_app(named, database_only=True)
        if needs == "sources":
            config = settings.load()["IDEMHOOK_CONFIG"]
            if not Path(config).exists():
                raise ConfigMissing(
                    f"{what} needs the sources file: {config} does not exist in {Path.cwd()} "
                    "(set IDEMHOOK_CONFIG)"
                )
        return create_app(named)
    except ConfigError as exc:  # a start-up error is one line, not a traceback
        raise ConfigMissing(str(exc)) from None


def main() -> None:
    """Console script ``idemhook``."""
    # Like gunicorn and `python -m`, make plugin modules beside the sources file importable.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    # Flask's with_appcontext finds the app through this object, when a command runs.
    cli.main(prog_name="idemhook", obj=ScriptInfo(create_app=_create_app, set_debug_flag=False))
