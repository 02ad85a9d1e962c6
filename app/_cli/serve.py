"""``idemhook serve``: the production server, gunicorn with the settings idemhook ships."""

from __future__ import annotations

import os
import sys

import click
from flask.cli import with_appcontext

#: The shipped gunicorn settings (PORT, WEB_CONCURRENCY, WEB_THREADS; docs/deploying.md).
SETTINGS = "idemhook._web.gunicorn_conf"
TARGET = "idemhook:create_app()"


@click.command(
    "serve",
    short_help="The production server: gunicorn with idemhook's settings.",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
@with_appcontext
def serve_command(gunicorn_args: tuple[str, ...]) -> None:
    """Serve the receiver with gunicorn and idemhook's settings, from any directory.

    PORT (default 8000), WEB_CONCURRENCY (worker processes, default 2) and
    WEB_THREADS (threads per worker, default 4) size it; any gunicorn option may
    follow and wins over the settings, e.g. `idemhook serve --access-logfile -`.
    """
    # The app was just built once here (with_appcontext), so a configuration mistake is one
    # line now instead of a traceback from every worker that fails to boot.
    argv = [sys.executable, "-m", "gunicorn", "--config", f"python:{SETTINGS}"]
    os.execv(sys.executable, [*argv, *gunicorn_args, TARGET])
