"""``idemhook worker``: the long-running process that delivers outbox messages (docs/outbox.md)."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext
from prometheus_client import start_http_server

from ..db import get_db
from ..metrics import OutboxCollector, OutboxMetrics
from ..sending import Delivery
from ..worker import Worker
from .common import ConfigMissing


def _address(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--metrics-bind")
    return host or "0.0.0.0", int(port)


@click.command("worker", short_help="Deliver outbox messages until stopped (SIGTERM).")
@click.option(
    "--metrics-bind",
    metavar="HOST:PORT",
    help="Serve this worker's Prometheus metrics at http://HOST:PORT/metrics.",
)
@with_appcontext
def worker_command(metrics_bind: str | None) -> None:
    """Deliver due outbox messages through their senders, until SIGTERM or Ctrl-C.

    Run as many as you like, on as many machines: they share the work
    (FOR UPDATE SKIP LOCKED). It wakes on LISTEN/NOTIFY when a claim that added
    messages commits, and polls every IDEMHOOK_WORKER_POLL_MS. On SIGTERM it
    finishes the message in hand and gives back the rest of its batch.
    """
    address = _address(metrics_bind)
    config = current_app.config
    registry = current_app.extensions["idemhook.registry"]
    if not registry.senders:
        raise ConfigMissing(
            "no @sender is registered, so `idemhook worker` has nothing to deliver: list the "
            "module of your senders in `plugins` (IDEMHOOK_CONFIG) or install it with an "
            "idemhook.handlers entry point (docs/outbox.md)"
        )
    database = get_db()
    metrics = OutboxMetrics()
    if address is not None:
        metrics.registry.register(OutboxCollector(database.engine))
        start_http_server(address[1], addr=address[0], registry=metrics.registry)
    delivery = Delivery(
        database, registry.senders, batch=config["IDEMHOOK_WORKER_BATCH"], metrics=metrics
    )
    listen = config["IDEMHOOK_WORKER_LISTEN_URL"]
    postgresql = database.engine.dialect.name == "postgresql"
    listen_url = None if listen == "off" or not postgresql else (listen or config["DATABASE_URL"])
    worker = Worker(
        [delivery],
        poll_seconds=config["IDEMHOOK_WORKER_POLL_MS"] / 1000,
        listen_url=listen_url,
        connect_timeout_ms=config["IDEMHOOK_STATEMENT_TIMEOUT_MS"],
    )
    worker.install_signal_handlers()
    worker.run()
