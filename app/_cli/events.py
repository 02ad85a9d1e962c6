"""``idemhook events``: list, show, stats, replay and prune processed events."""

from __future__ import annotations

import json

import click
from flask import current_app

from idemhook._cli.common import (
    ConfigMissing,
    DatabaseGroup,
    database_only,
    echo_traceback,
    emit_json_lines,
    emit_table,
    filter_options,
    listing_options,
    needs_sources,
)
from idemhook._config.reconcile import human
from idemhook._engine import replay, retention
from idemhook._engine.reconcile import retention_of
from idemhook._store import queries
from idemhook._store.database import get_db
from idemhook._store.models import EVENT_STATUSES
from idemhook._values.errors import ConfigError

events_cli = DatabaseGroup("events", help="Query, replay and prune processed events.")

LIST_TABLE = ("received_at", "source", "event_id", "event_type", "status", "duplicate_count")
#: With ``--status received``: where each waiting event stands with the worker.
WAITING_TABLE = (
    *LIST_TABLE[:5],
    "attempts",
    "next_attempt_at",
    "order_key",
    "interruptions",  # last: the columns before it keep their places
)


@database_only
@events_cli.command("list")
@filter_options
@click.option(
    "--status",
    type=click.Choice(EVENT_STATUSES),
    help="Only this status (received: waiting for idemhook worker, docs/async.md).",
)
@click.option("--client", help="Only this client's keys (idempotency-key sources).")
@listing_options
def events_list(source, event_type, since, until, status, client, limit, as_json) -> None:
    """List processed events, newest first."""
    filters = queries.Filters(source, event_type, status, since, until, client=client)
    with get_db().session() as session:
        rows, _next = queries.list_events(session, filters, limit)
    if as_json:
        emit_json_lines(rows)
    else:
        emit_table(rows, WAITING_TABLE if status == "received" else LIST_TABLE)


@database_only
@events_cli.command("show")
@click.argument("source")
@click.argument("event_id")
@click.option(
    "--client", help="EVENT_ID is this client's Idempotency-Key (idempotency-key sources)."
)
@click.option("--json", "as_json", is_flag=True, help="The row as one JSON object.")
def events_show(source: str, event_id: str, client: str | None, as_json: bool) -> None:
    """Show every column of one event, and its failures."""
    event_id = queries.event_id_of(event_id, client)
    with get_db().session() as session:
        event = queries.get_event(session, source, event_id)
        failures = queries.failures_of(session, source, event_id) if event is None else []
    if event is None:
        hint = (
            f" ({len(failures)} failed attempts and no success yet: see `idemhook failures "
            f"show {failures[-1]['id']}` or retry with `idemhook failures retry`)"
            if failures
            else " (never received, or pruned)"
        )
        raise click.ClickException(f"no event {event_id!r} from source {source!r}{hint}")
    if as_json:
        emit_json_lines([event])
        return
    failures = event.pop("failures")
    width = max(len(k) for k in event)
    for key, value in event.items():
        pretty = key in ("payload", "result", "response_headers", "headers")
        shown = json.dumps(value, indent=2, default=str) if pretty else value
        click.echo(f"{key.ljust(width)}  {'-' if shown is None else shown}")
    click.echo(f"{'failures'.ljust(width)}  {len(failures)}")
    for failure in failures:
        click.echo(f"  {failure['failed_at']}  failure {failure['id']}  {failure['error']}")
        echo_traceback(failure["traceback"], indent="    ")


@database_only
@events_cli.command("stats")
@filter_options
@click.option("--by", type=click.Choice(queries.STATS_BY), default="type", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group.")
def events_stats(source, event_type, since, until, by, as_json) -> None:
    """Count events by status, duplicates received and failures, per type, source or hour."""
    filters = queries.Filters(source, event_type, None, since, until)
    with get_db().session() as session:
        result = queries.stats(session, filters, by)
    groups = result["groups"]
    if as_json:
        emit_json_lines(groups)
        return
    statuses = sorted({s for g in groups for s in g["by_status"]})
    rows = [
        {
            by: g["key"],
            "events": g["events"],
            **g["by_status"],
            "duplicates": g["duplicates"],
            "failures": g["failures"],
        }
        for g in groups
    ]
    totals = result["totals"]
    rows.append({by: "TOTAL", **totals, **totals["by_status"]})
    emit_table(rows, (by, "events", *statuses, "duplicates", "failures"))


@needs_sources
@events_cli.command("replay")
@click.argument("source")
@click.argument("event_id")
@click.option("--force", is_flag=True, help="Really run the handlers again.")
@click.option("--json", "as_json", is_flag=True, help="Print the updated row as JSON.")
def events_replay(source: str, event_id: str, force: bool, as_json: bool) -> None:
    """Run the handlers again for an already processed event, from its stored payload.

    Handlers run in one transaction with the update of result, replayed_at and
    replay_count; their side effects happen a second time, hence --force. For a source
    with freshness, a stale event (one older than what its object holds) is said so;
    --force applies it anyway and makes it its object's version.
    """
    receiver = current_app.extensions["idemhook.receiver"]
    claimer = receiver.claimer
    if not force:
        try:
            stale = replay.staleness(claimer, receiver.sources, source, event_id)
        except replay.ActionRefused as exc:
            raise click.ClickException(str(exc)) from None
        if stale is not None:
            raise click.UsageError(
                f"{stale}. Add --force to apply it anyway: its handlers run as for a new "
                f"event and {stale.object_key!r} goes back to its version"
            )
        raise click.UsageError(
            "replay runs the handlers a second time (their effects happen again); "
            "add --force if that is what you want"
        )
    try:
        event = replay.replay(claimer, source, event_id, receiver.sources)
    except replay.ActionRefused as exc:
        raise click.ClickException(str(exc)) from None
    except replay.ReplayFailed as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json_lines([event])
    else:
        click.echo(
            f"replayed {source}/{event_id} (replay #{event['replay_count']} at "
            f"{event['replayed_at']}); result: {json.dumps(event['result'], default=str)}"
        )


@database_only
@events_cli.command("prune")
@click.option(
    "--older-than",
    help="Age of the rows to prune: 30d, 12h, 2w (default: IDEMHOOK_RETENTION).",
)
@click.option(
    "--payloads-only",
    is_flag=True,
    help="Keep the rows (the dedupe memory), drop only payloads and raw bodies.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be pruned.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=5000,
    show_default=True,
    help="Rows per transaction.",
)
def events_prune(
    older_than: str | None, payloads_only: bool, dry_run: bool, batch_size: int
) -> None:
    """Delete events, failures and refused deliveries older than --older-than (or
    IDEMHOOK_RETENTION), in short batches."""
    try:
        kept = retention_of(current_app.config["IDEMHOOK_RETENTION"])
    except ConfigError as exc:
        raise ConfigMissing(str(exc)) from None
    if older_than is None:
        if kept is None:
            raise ConfigMissing("give --older-than (e.g. 30d) or set IDEMHOOK_RETENTION")
        older_than = human(kept)
    try:
        age = queries.parse_duration(older_than)
    except queries.QueryError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    if kept is not None and not payloads_only and age < kept:
        # Reconcile lookbacks were checked against IDEMHOOK_RETENTION (docs/reconcile.md).
        raise ConfigMissing(
            f"--older-than {older_than} is shorter than IDEMHOOK_RETENTION "
            f"({human(kept)}), which claims are promised to be kept: a reconcile run or "
            "a provider's retry would apply a pruned event again; prune --payloads-only, or "
            "lower IDEMHOOK_RETENTION first"
        )
    if not payloads_only and age < queries.LONGEST_RETRY_WINDOW:
        click.echo(
            f"warning: {older_than} is shorter than the longest provider retry window (3 days): "
            "a retry arriving after its claim is pruned is applied again "
            "(see docs/querying.md)",
            err=True,
        )
    report = retention.prune(
        get_db().engine,
        age,
        payloads_only=payloads_only,
        dry_run=dry_run,
        batch_size=batch_size,
    )
    what = "payloads of" if payloads_only else ""
    verb = "would prune" if dry_run else "pruned"
    batches = "" if dry_run else f" in {report.batches} batches"
    click.echo(
        f"{verb} {what} {report.events} events and {report.failures} failures "
        f"received before {queries.iso(report.cutoff)}{batches}".replace("  ", " ")
        + ("" if payloads_only else f"; {report.rejections} refused deliveries")
    )
