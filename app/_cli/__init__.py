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

import click
from flask import Flask

from idemhook._cli.db import db_cli
from idemhook._cli.events import events_cli
from idemhook._cli.failures import failures_cli
from idemhook._cli.handlers import handlers_cli
from idemhook._cli.objects import objects_cli
from idemhook._cli.outbox import outbox_cli
from idemhook._cli.reconcile import reconcile_command
from idemhook._cli.rejections import rejections_cli
from idemhook._cli.secrets import secrets_cli
from idemhook._cli.send import send_command
from idemhook._cli.serve import serve_command
from idemhook._cli.sign import sign_command
from idemhook._cli.sources import sources_cli
from idemhook._cli.worker import worker_command

COMMANDS = (
    db_cli,
    serve_command,
    sign_command,
    sources_cli,
    secrets_cli,
    handlers_cli,
    send_command,
    events_cli,
    failures_cli,
    objects_cli,
    outbox_cli,
    reconcile_command,
    rejections_cli,
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
    list/show, objects, outbox, rejections) need only DATABASE_URL. Exit status 2 means a usage or
    configuration problem, said in one line.
    """
