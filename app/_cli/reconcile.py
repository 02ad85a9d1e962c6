"""``idemhook reconcile SOURCE``: apply what the provider logged and never got through
(docs/reconcile.md)."""

from __future__ import annotations

import json
from datetime import timedelta

import click
from flask import current_app
from flask.cli import with_appcontext

from idemhook._cli.common import ConfigMissing, emit_json_lines, emit_table, needs_sources
from idemhook._config.reconcile import ReconcileConfig
from idemhook._engine.reconcile import retention_of
from idemhook._engine.reconcile.run import Busy, Reconciliation, Report, window_of
from idemhook._engine.worker import worker_name
from idemhook._store import queries
from idemhook._store.database import get_db

#: Event IDs a dry run names in its text output (``--json`` lists them all).
SHOWN = 50
HISTORY_COLUMNS = (
    "id",
    "started_at",
    "started_by",
    "outcome",
    "seen",
    "already",
    "recovered",
    "failed",
    "error",
)


@needs_sources
@click.command("reconcile", short_help="Apply the events a provider logged and never got through.")
@click.argument("source")
@click.option(
    "--since",
    metavar="DURATION",
    help="Look back this far (6h, 3d); default: the source's lookback.",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be applied; change nothing.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object: the figures and the IDs applied now (with --history: a run a line).",
)
@click.option("--history", is_flag=True, help="Show the source's last runs instead of running.")
@click.option(
    "--limit",
    type=click.IntRange(1, queries.MAX_LIMIT),
    default=20,
    show_default=True,
    help="With --history: how many runs.",
)
@with_appcontext
def reconcile_command(
    source: str, since: str | None, dry_run: bool, as_json: bool, history: bool, limit: int
) -> None:
    """Ask SOURCE's provider for the events of its lookback (Stripe's events list, GitHub's
    hook deliveries, or a plugin's @reconciler) and apply, through the same claim as a
    live delivery, each one idemhook has no record of.

    Prints what it saw, how many were already applied, applied now, and failed. Exit
    status 0: the run completed; 1: the provider refused or failed (or another run of
    SOURCE is in progress); 2: a usage or configuration problem.
    """
    config = _config(source)
    if history:
        _history(source, limit, as_json)
        return
    lookback = _since(since, config) if since is not None else config.lookback
    receiver = current_app.extensions["idemhook.receiver"]
    reconciliation = Reconciliation(
        engine=get_db().engine,
        source=receiver.sources[source],
        config=config,
        registry=current_app.extensions["idemhook.registry"],
        claimer=receiver.claimer,
        acceptor=receiver.acceptor,
        owner=worker_name(),
    )
    try:
        report = reconciliation.run(window_of(lookback), started_by="command", dry_run=dry_run)
    except Busy as exc:
        raise click.ClickException(f"{exc}; try again when it ends") from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        click.echo(_summary(report))
    if report.outcome != "succeeded":
        if not as_json:
            click.echo(f"Error: {source}: {report.error}", err=True)
        raise SystemExit(1)


def _config(source: str) -> ReconcileConfig:
    sources = current_app.extensions["idemhook.receiver"].sources
    if source not in sources:
        raise ConfigMissing(
            f"no source named {source!r}; configured: {', '.join(sorted(sources)) or 'none'}"
        )
    configs = current_app.extensions["idemhook.reconcile"]
    if source not in configs:
        reconciled = ", ".join(sorted(configs)) or "none"
        raise ConfigMissing(
            f"source {source!r} is not reconciled: add [sources.{source}.reconcile] "
            f"(docs/reconcile.md); reconciled sources: {reconciled}"
        )
    return configs[source]


def _since(text: str, config: ReconcileConfig) -> timedelta:
    try:
        since = queries.parse_duration(text)
    except queries.QueryError as exc:
        raise ConfigMissing(f"--since: {exc}") from None
    if since <= timedelta(0):
        raise ConfigMissing("--since: a positive duration like 6h or 3d")
    retention = retention_of(current_app.config["IDEMHOOK_RETENTION"])
    if retention is not None and since >= retention:
        raise ConfigMissing(
            f"--since {text} reaches past IDEMHOOK_RETENTION: events whose claims were pruned "
            "would be applied again; look back less far"
        )
    return since


def _summary(report: Report) -> str:
    window = (
        f"events from {report.window.since:%Y-%m-%d %H:%M:%S}Z to "
        f"{report.window.until:%Y-%m-%d %H:%M:%S}Z"
    )
    if report.dry_run:
        line = (
            f"{report.source} (dry run, nothing changed): saw {report.seen} {window}; "
            f"{report.already} already applied, {report.recovered} would be applied, "
            f"{report.failed} could not be read"
        )
        if report.applied:
            shown = report.applied[:SHOWN]
            more = report.recovered - len(shown)
            line += "\nwould apply: " + " ".join(shown)
            if more > 0:
                line += f" and {more} more (--json lists them all)"
        return line
    line = (
        f"{report.source}: run {report.run_id} {report.outcome}: saw {report.seen} {window}; "
        f"{report.already} already applied, {report.recovered} applied now, "
        f"{report.failed} failed"
    )
    if report.failed:
        line += f" (idemhook failures list --source {report.source})"
    return line


def _history(source: str, limit: int, as_json: bool) -> None:
    with get_db().session() as session:
        rows, _next = queries.list_runs(session, source, limit)
    if as_json:
        emit_json_lines(rows)
    elif rows:
        emit_table(rows, HISTORY_COLUMNS)
    else:
        click.echo(f"{source} has not been reconciled yet")
