"""The ``idemhook`` command: Flask's CLI with idemhook's commands attached.

One module per command group in this package. :func:`init_app` registers them
on ``app.cli``, so tests reach them through ``app.test_cli_runner()`` and the
console script through :class:`flask.cli.FlaskGroup`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flask import Flask
from flask.cli import FlaskGroup

from .db import db_cli
from .events import events_cli
from .failures import failures_cli
from .sign import sign_command

COMMANDS = (db_cli, sign_command, events_cli, failures_cli)


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

    group = FlaskGroup(
        name="idemhook",
        create_app=lambda: create_app(),
        help="idemhook: webhook receiver. Commands read DATABASE_URL and IDEMHOOK_CONFIG.",
    )
    group.main(prog_name="idemhook")
