"""``idemhook worker``: the long-running process that delivers outbox messages (docs/outbox.md)
and applies asynchronous sources' received events (docs/async.md)."""

from __future__ import annotations

from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext
from prometheus_client import start_http_server
from sqlalchemy.exc import SQLAlchemyError

from idemhook._cli.common import ConfigMissing
from idemhook._engine.applier import Applier
from idemhook._engine.reconcile.schedule import Scheduled
from idemhook._engine.sender import Delivery
from idemhook._engine.worker import Work, Worker, worker_name
from idemhook._store.database import (
    Database,
    get_db,
)
from idemhook._store.engine import (
    Timeouts,
    application_name,
    build_engine,
)
from idemhook._store.refusals import held
from idemhook._web.metrics import (
    Metrics,
    OutboxCollector,
    OutboxMetrics,
    QueueCollector,
    ReconcileCollector,
)


def _address(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--metrics-bind")
    return host or "0.0.0.0", int(port)


@click.command(
    "worker",
    short_help="Send outbox messages, apply events, reconcile (until SIGTERM).",
)
@click.option(
    "--metrics-bind",
    metavar="HOST:PORT",
    help="Serve this worker's Prometheus metrics at http://HOST:PORT/metrics.",
)
@with_appcontext
def worker_command(metrics_bind: str | None) -> None:
    """Deliver due outbox messages, apply asynchronous sources' received events (and a
    resumed source's, received while it was paused) and reconcile the sources with a
    reconcile `every`, until SIGTERM or Ctrl-C.

    Run as many as you like, on as many machines: they share the work
    (FOR UPDATE SKIP LOCKED). It wakes on LISTEN/NOTIFY when a claim that added
    messages or received events commits, and polls every IDEMHOOK_WORKER_POLL_MS.
    On SIGTERM it finishes the message or event in hand and gives back the rest.
    Each reconcile slot is run by one worker (docs/reconcile.md).
    """
    address = _address(metrics_bind)
    config = current_app.config
    registry = current_app.extensions["idemhook.registry"]
    sources = current_app.extensions["idemhook.receiver"].sources
    queued = sorted(name for name, source in sources.items() if source.asynchronous)
    # A synchronous source's deliveries wait for the worker too while it is paused.
    webhooks = sorted(name for name, source in sources.items() if not source.scheme.operation)
    scheduled = {
        name: config
        for name, config in current_app.extensions["idemhook.reconcile"].items()
        if config.every is not None
    }
    # Only synchronous sources: work only while one is paused or its events wait.
    if not registry.senders and not queued and not scheduled and not _held():
        raise ConfigMissing(
            'no @sender is registered, no source has mode = "async" and none is reconciled '
            "`every` so often, so `idemhook worker` has nothing to do: list the module of "
            "your senders in `plugins` (IDEMHOOK_CONFIG) or install it with an "
            "idemhook.handlers entry point (docs/outbox.md), make a source asynchronous "
            "(docs/async.md), or set [sources.<name>.reconcile] every (docs/reconcile.md); "
            "it also runs while a source is paused (idemhook sources pause) or its events wait"
        )
    database = _database(config)
    metrics = Metrics()
    outbox_metrics = OutboxMetrics(registry=metrics.registry)
    if address is not None:
        metrics.registry.register(OutboxCollector(database.engine))
        metrics.registry.register(QueueCollector(database.engine, queued))
        metrics.registry.register(ReconcileCollector(database.engine, sorted(scheduled)))
        start_http_server(address[1], addr=address[0], registry=metrics.registry)
    batch = config["IDEMHOOK_WORKER_BATCH"]
    works: list[Work] = []
    if registry.senders:
        works.append(Delivery(database, registry.senders, batch=batch, metrics=outbox_metrics))
    if webhooks:
        # Every configured source: one switched back to sync may still have events waiting,
        # and a paused one's wait for its resume (idemhook sources pause).
        works.append(
            Applier(
                database,
                registry,
                sources,
                batch=batch,
                metrics=metrics,
                handler_timeout_ms=config["IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS"],
            )
        )
    if scheduled:
        # A run applies what it finds through the web's own claim and acknowledgement,
        # the path a live delivery takes (docs/reconcile.md).
        receiver = current_app.extensions["idemhook.receiver"]
        works.append(
            Scheduled(
                engine=get_db().engine,
                sources=sources,
                configs=scheduled,
                registry=registry,
                claimer=receiver.claimer,
                acceptor=receiver.acceptor,
                owner=worker_name(),
            )
        )
    listen = config["IDEMHOOK_WORKER_LISTEN_URL"]
    postgresql = database.engine.dialect.name == "postgresql"
    listen_url = None if listen == "off" or not postgresql else (listen or config["DATABASE_URL"])
    worker = Worker(
        works,
        poll_seconds=config["IDEMHOOK_WORKER_POLL_MS"] / 1000,
        listen_url=listen_url,
        connect_timeout_ms=config["IDEMHOOK_STATEMENT_TIMEOUT_MS"],
        listen_name=f"{application_name(config)}-listen",
    )
    worker.install_signal_handlers()
    try:
        worker.run()
    finally:
        database.engine.dispose()


def _held() -> bool:
    """Whether a source is paused or received events wait (False if it cannot be read)."""
    try:
        return held(get_db().engine)
    except SQLAlchemyError:
        return False


def _database(config: Any) -> Database:
    """The worker's own connections: the claim's timeouts, but room for slow handlers.

    A received event's handlers may run for ``IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS``
    (the provider is not waiting any more), so the backstop that ends a session
    idle in its transaction is that plus the statement timeout.
    """
    statement = int(config["IDEMHOOK_STATEMENT_TIMEOUT_MS"])
    handler = int(config["IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS"])
    timeouts = Timeouts(statement, statement, handler + statement)
    mode = config["IDEMHOOK_POOL_MODE"]
    # One lane at a time, and one more for each claim thread a stuck handler may hold.
    engine = build_engine(
        config["DATABASE_URL"],
        timeouts=timeouts,
        pool_size=4,
        pool_mode=mode,
        name=application_name(config),
    )
    return Database(
        engine,
        timeouts=timeouts,
        pool_mode=mode,
        name=application_name(config),
        prepare=bool(config["IDEMHOOK_PREPARED_STATEMENTS"]),
    )
