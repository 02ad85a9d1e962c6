"""``idemhook failures``: list failed deliveries and retry them through the claim path."""

from __future__ import annotations

import click
from flask import current_app

from idemhook._cli.common import (
    DatabaseGroup,
    database_only,
    echo_traceback,
    emit_json_lines,
    emit_table,
    filter_options,
    listing_options,
    needs_sources,
)
from idemhook._engine import failures
from idemhook._store import queries
from idemhook._store.database import get_db
from idemhook._values.errors import IdemhookError

failures_cli = DatabaseGroup("failures", help="List, show and retry failed deliveries.")

LIST_TABLE = ("id", "failed_at", "source", "event_id", "event_type", "resolved", "error")


@database_only
@failures_cli.command("list")
@filter_options
@click.option("--pending", is_flag=True, help="Only failures whose event has not applied since.")
@listing_options
def failures_list(source, event_type, since, until, pending, limit, as_json) -> None:
    """List failed deliveries, newest first."""
    filters = queries.Filters(source, event_type, None, since, until, pending=pending)
    with get_db().session() as session:
        rows, _next = queries.list_failures(session, filters, limit)
    if as_json:
        emit_json_lines(rows)
    else:
        emit_table(rows, LIST_TABLE)


@database_only
@failures_cli.command("show")
@click.argument("failure_id", metavar="ID", type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="The failure as one JSON object.")
def failures_show(failure_id: int, as_json: bool) -> None:
    """Show one failed attempt (ID from `failures list`), with the handler's traceback."""
    with get_db().session() as session:
        failure = queries.get_failure(session, failure_id)
    if failure is None:
        raise click.ClickException(f"no failure with id {failure_id} (never recorded, or pruned)")
    if as_json:
        emit_json_lines([failure])
        return
    traceback = failure.pop("traceback")
    width = max(len(k) for k in failure)
    for key, value in failure.items():
        click.echo(f"{key.ljust(width)}  {'-' if value is None else value}")
    click.echo("traceback" if traceback else f"{'traceback'.ljust(width)}  -")
    echo_traceback(traceback, indent="  ")


@needs_sources
@failures_cli.command("retry")
@click.argument("source", required=False)
@click.argument("event_id", required=False)
@click.option("--all", "retry_all", is_flag=True, help="Every failure not applied since.")
@click.option("--since", type=click.STRING, help="With --all: failures from this time on.")
@click.option("--source", "only_source", help="With --all: only this source.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per retried event.")
def failures_retry(source, event_id, retry_all, since, only_source, as_json) -> None:
    """Re-run the stored raw body of a failed event through the normal claim path.

    For events the provider has stopped retrying. The signature was verified on
    receipt and is not checked again. Exits 1 if any retried event fails again.
    """
    if retry_all == bool(source or event_id):
        raise click.UsageError("give SOURCE EVENT_ID, or --all [--since T] [--source S]")
    if not retry_all and not event_id:
        raise click.UsageError("give both SOURCE and EVENT_ID")
    receiver = current_app.extensions["idemhook.receiver"]
    if retry_all:
        try:
            since_at = queries.parse_when(since) if since else None
        except queries.QueryError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
        filters = queries.Filters(source=only_source, since=since_at)
        with get_db().session() as session:
            targets = list(failures.pending_failures(session, filters))
    else:
        targets = [(source, event_id)]
    results = []
    for target_source, target_id in targets:
        try:
            result = failures.retry_failure(
                receiver.claimer, receiver.sources, target_source, target_id
            )
        except (failures.ActionRefused, IdemhookError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            result = failures.RetryResult(target_source, target_id, "refused", message)
        results.append(result)
        if as_json:
            emit_json_lines([result.to_dict()])
        else:
            click.echo(f"{target_source}/{target_id}: {result.status} ({result.detail})")
    if not targets and not as_json:
        click.echo("nothing to retry")
    if any(r.status in ("failed", "refused") for r in results):
        raise SystemExit(1)
