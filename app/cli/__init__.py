"""The ``idemhook`` command: Flask's CLI with idemhook's commands attached.

One module per command group in this package. :func:`init_app` registers them
on ``app.cli``, so tests reach them through ``app.test_cli_runner()`` and the
console script through :class:`flask.cli.FlaskGroup`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from flask import Flask
from flask.cli import FlaskGroup

from ..errors import ConfigError
from .db import db_cli
from .events import events_cli
from .failures import failures_cli
from .handlers import handlers_cli
from .send import send_command
from .sign import sign_command
from .sources import sources_cli

COMMANDS = (
    db_cli,
    sign_command,
    sources_cli,
    handlers_cli,
    send_command,
    events_cli,
    failures_cli,
)


def init_app(app: Flask) -> None:
    for command in COMMANDS:
        app.cli.add_command(command)


def main() -> None:
    """Console script ``idemhook``."""
    # Like gunicorn and `python -m`, make plugin modules beside the sources file importable.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    from .. import create_app

    def create() -> Flask:
        try:
            return create_app()
        except ConfigError as exc:  # a start-up error is a message, not a traceback
            raise click.ClickException(str(exc)) from exc

    group = FlaskGroup(
        name="idemhook",
        create_app=create,
        help="idemhook: webhook receiver. Commands read DATABASE_URL and IDEMHOOK_CONFIG.",
    )
    # Also on the group itself, so it runs when a broken source stops the app from
    # loading: diagnosing that is its job (it loads the app itself when it can).
    group.add_command(sources_cli)
    group.main(prog_name="idemhook")
