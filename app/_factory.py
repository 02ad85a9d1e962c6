"""The app factory, and the ``idemhook`` command's: the top of the package.

``create_app()`` is the only entry point: gunicorn serves ``idemhook:create_app()``,
the ``idemhook`` command (:func:`main`) builds the app the same way, as much of it as
the command being run needs. Nothing connects to a database or reads the environment
at import time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from flask import Flask
from flask.cli import ScriptInfo
from werkzeug.middleware.proxy_fix import ProxyFix

from idemhook import _cli as cli
from idemhook._cli.common import NEEDS_ATTRIBUTE, ConfigMissing
from idemhook._config import secrets, settings, sources
from idemhook._engine import logs, reconcile
from idemhook._engine import registry as plugins
from idemhook._engine.accept import Acceptor
from idemhook._engine.claim import Claimer
from idemhook._engine.pauses import Pauses
from idemhook._engine.refusals import Refusals
from idemhook._engine.tenants import Matches, Tenants
from idemhook._store import database as db
from idemhook._store.engine import APPLICATION_NAMES
from idemhook._values import errors
from idemhook._values.errors import ConfigError
from idemhook._web import api, dashboard, direct, health, intake, metrics, operations, problems
from idemhook._web.json_provider import JSONProvider

log = logging.getLogger("idemhook")


def create_app(
    test_config: Mapping[str, Any] | None = None,
    *,
    database_only: bool = False,
    migrations_only: bool = False,
    needs_database: bool = True,
) -> Flask:
    """Build the receiver: settings, sources, plugins, database, routes, CLI.

    What a command builds (docs/operations.md, "What each command needs"):
    ``database_only``: settings, database and CLI alone, for the commands that only
    read the tables; no sources file is read, no plugin imported, no secret needed.
    ``migrations_only``: the same and the plugins (for their migrations), read from
    the sources file's ``plugins`` list; no source is parsed, no secret needed.
    ``needs_database=False``: everything, for a command that never touches the
    database, so ``DATABASE_URL`` may be unset.
    """
    app = Flask(__name__)
    app.json = JSONProvider(app)
    app.config.update(settings.load(test_config, needs_database=needs_database))
    if database_only:
        db.init_app(app)
        cli.init_app(app)
        return app
    config = app.config["IDEMHOOK_CONFIG"]
    if config == settings.DEFAULTS["IDEMHOOK_CONFIG"] and not Path(config).exists():
        log.warning("no %s in %s: serving no sources (set IDEMHOOK_CONFIG)", config, Path.cwd())
        config = {}
    if migrations_only:
        listed = sources.plugins_of(*sources.read(config))
        app.extensions["idemhook.registry"] = plugins.load(listed)
        db.init_app(app)
        cli.init_app(app)
        return app
    loaded = sources.load(config, max_body_bytes=app.config["IDEMHOOK_MAX_BODY_BYTES"])
    registry = plugins.load(loaded.plugins)
    registry.check_sources(loaded.sources)
    registry.configure_senders(loaded.outbox)
    app.extensions["idemhook.registry"] = registry
    retention = reconcile.retention_of(app.config["IDEMHOOK_RETENTION"])
    app.extensions["idemhook.reconcile"] = reconcile.configured(loaded.sources, registry, retention)

    tenanted = sorted(name for name, source in loaded.sources.items() if source.tenants)
    needed_by = f"source(s) {', '.join(tenanted)} with tenants = true" if tenanted else ""
    box = secrets.box_of(app.config["IDEMHOOK_SECRETS_KEY"], needed_by=needed_by)
    app.extensions["idemhook.secrets"] = box

    errors.init_app(app)
    logs.init_app(app)
    database = db.init_app(app)
    claimer = Claimer(
        database,
        registry,
        observers=[logs.log_outcome],
        handler_timeout_ms=app.config["IDEMHOOK_HANDLER_TIMEOUT_MS"],
        claim_threads=2 * app.config["IDEMHOOK_POOL_SIZE"],
    )
    acceptor = Acceptor(database, observers=[logs.log_accepted])
    matches = Matches(database)
    app.extensions["idemhook.matches"] = matches
    tenants = Tenants(database, box, matches)
    refusals = Refusals(database, app.config["IDEMHOOK_REJECTIONS_PER_MINUTE"])
    receiver = intake.Receiver(
        loaded.sources, claimer, acceptor, tenants, refusals, Pauses(database)
    )
    intake.init_app(app, receiver)
    direct.init_app(app, receiver)  # inside the request timer and ProxyFix, added below
    health.init_app(app)
    queued = [name for name, source in loaded.sources.items() if source.asynchronous]
    webhooks = sorted(n for n, source in loaded.sources.items() if not source.scheme.operation)
    metrics.init_app(
        app,
        claimer,
        acceptor,
        queued,
        sorted(app.extensions["idemhook.reconcile"]),
        refusals=refusals,
        sources=webhooks,
        matches=matches,
    )
    api.init_app(app)
    dashboard.init_app(app)
    # The plugins' own routes (IDEMHOOK_BLUEPRINT), after idemhook's: none may take one.
    plugins.register_blueprints(app, registry)
    problems.init_app(app)
    # Last of the routes: an API source's path must not take one of the others.
    operations.init_app(app, loaded.sources, claimer, matches)
    cli.init_app(app)
    proxies = app.config["IDEMHOOK_TRUSTED_PROXIES"]
    if proxies:
        # Only when told: X-Forwarded-* from an untrusted client would let it choose
        # the URL a signature is checked against.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=proxies,
            x_proto=proxies,
            x_host=proxies,
            x_port=proxies,
            x_prefix=proxies,
        )
    return app


def app_for_command() -> Flask:
    """Build the app for the command being run, as much of it as that command needs."""
    ctx = click.get_current_context(silent=True)
    needs = getattr(ctx.command, NEEDS_ATTRIBUTE, frozenset()) if ctx is not None else frozenset()
    what = f"`{ctx.command_path}`" if ctx is not None else "this command"
    # Each process says what it is in pg_stat_activity (unless the operator named it).
    role = "worker" if ctx is not None and ctx.command.name == "worker" else "cli"
    named = None
    if not os.environ.get("IDEMHOOK_APPLICATION_NAME"):
        named = {"IDEMHOOK_APPLICATION_NAME": APPLICATION_NAMES[role]}
    try:
        if "database only" in needs:
            return create_app(named, database_only=True)
        if "migrations only" in needs:
            return create_app(named, migrations_only=True)
        database = "no database" not in needs
        if "sources file" in needs:
            config = settings.load(needs_database=database)["IDEMHOOK_CONFIG"]
            if not Path(config).exists():
                raise ConfigMissing(
                    f"{what} needs the sources file: {config} does not exist in {Path.cwd()} "
                    "(set IDEMHOOK_CONFIG)"
                )
        return create_app(named, needs_database=database)
    except ConfigError as exc:  # a start-up error is one line, not a traceback
        raise ConfigMissing(str(exc)) from None


def main() -> None:
    """Console script ``idemhook``."""
    # Like gunicorn and `python -m`, make plugin modules beside the sources file importable.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    # Flask's with_appcontext finds the app through this object, when a command runs.
    info = ScriptInfo(create_app=app_for_command, set_debug_flag=False)
    cli.cli.main(prog_name="idemhook", obj=info)
