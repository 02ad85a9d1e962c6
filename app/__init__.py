"""idemhook: a webhook receiver that makes provider retries harmless.

The public API, everything a plugin author imports (docs/plugins.md)::

    from idemhook import handler, Ignore, Reject, Response, Event
    from idemhook import sender, Message          # the outbox (docs/outbox.md)
    from idemhook import api_view                 # an API's own routes (docs/plugins.md)

``idemhook.testing`` holds the test kit (``Kit``, ``deliver``, ``signed``, ``ANY``)
and, through its pytest plugin, the ``idemhook`` fixture. Every other module is
internal and private by name (``idemhook._engine``, ``idemhook._store``, ...).

``create_app()`` is the only entry point: gunicorn serves ``idemhook:create_app()``,
the ``idemhook`` CLI builds the app the same way. Nothing connects to a database
or reads the environment at import time.

The repository keeps this package in ``app/`` (setuptools' ``package-dir`` maps it to
``idemhook``, see pyproject.toml).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from flask import Flask
from idemhook import _cli as cli
from idemhook._config import settings, sources
from idemhook._engine import logs
from idemhook._engine import registry as plugins
from idemhook._engine.accept import Acceptor
from idemhook._engine.claim import Claimer
from idemhook._engine.outbox import Message
from idemhook._engine.registry import Event, Ignore, Reject, Response, handler, sender
from idemhook._store import database as db
from idemhook._values import errors
from idemhook._web import api, dashboard, health, intake, metrics, operations, problems
from idemhook._web.json_provider import JSONProvider
from idemhook._web.operations import api_view
from werkzeug.middleware.proxy_fix import ProxyFix

__all__ = [
    "Event",
    "Ignore",
    "Message",
    "Reject",
    "Response",
    "api_view",
    "create_app",
    "handler",
    "sender",
]

try:
    __version__ = version("idemhook")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

log = logging.getLogger("idemhook")


def create_app(
    test_config: Mapping[str, Any] | None = None, *, database_only: bool = False
) -> Flask:
    """Build the receiver: settings, sources, plugins, database, routes, CLI.

    ``database_only``: settings, database and CLI alone, for the commands that only
    read the tables; no sources file is read, no plugin imported, no secret needed.
    """
    app = Flask(__name__)
    app.json = JSONProvider(app)
    app.config.update(settings.load(test_config))
    if database_only:
        db.init_app(app)
        cli.init_app(app)
        return app
    config = app.config["IDEMHOOK_CONFIG"]
    if config == settings.DEFAULTS["IDEMHOOK_CONFIG"] and not Path(config).exists():
        log.warning("no %s in %s: serving no sources (set IDEMHOOK_CONFIG)", config, Path.cwd())
        config = {}
    loaded = sources.load(config, max_body_bytes=app.config["IDEMHOOK_MAX_BODY_BYTES"])
    registry = plugins.load(loaded.plugins)
    registry.check_sources(loaded.sources)
    registry.configure_senders(loaded.outbox)
    app.extensions["idemhook.registry"] = registry

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
    intake.init_app(app, intake.Receiver(loaded.sources, claimer, acceptor))
    health.init_app(app)
    queued = [name for name, source in loaded.sources.items() if source.asynchronous]
    metrics.init_app(app, claimer, acceptor, queued)
    api.init_app(app)
    dashboard.init_app(app)
    # The plugins' own routes (IDEMHOOK_BLUEPRINT), after idemhook's: none may take one.
    plugins.register_blueprints(app, registry)
    problems.init_app(app)
    # Last of the routes: an API source's path must not take one of the others.
    operations.init_app(app, loaded.sources, claimer)
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
