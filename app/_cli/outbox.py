"""``idemhook outbox``: list, show, retry and prune outbox messages (docs/outbox.md)."""

from __future__ import annotations

import json

import click

from idemhook._cli.common import (
    WHEN,
    DatabaseGroup,
    database_only,
    emit_json_lines,
    emit_table,
    listing_options,
)
from idemhook._engine import outbox
from idemhook._store import queries
from idemhook._store.database import get_db
from idemhook._values.outbox_status import MESSAGE_STATUSES

outbox_cli = DatabaseGroup("outbox", help="List, show, retry and prune outbox messages.")

LIST_TABLE = ("id", "created_at", "kind", "status", "attempts", "next_attempt_at", "key")


@database_only
@outbox_cli.command("list")
@click.option("--kind", help="Only this kind (email, ...).")
@click.option("--status", type=click.Choice(MESSAGE_STATUSES), help="Only this status.")
@click.option("--source", help="Only messages added by this source's handlers.")
@click.option("--since", type=WHEN, help="Created from this time on: 2h, 30d, or ISO 8601.")
@click.option("--until", type=WHEN, help="Created before this time: 2h, 30d, or ISO 8601.")
@listing_options
def outbox_list(kind, status, source, since, until, limit, as_json) -> None:
    """List outbox messages, newest first."""
    filters = queries.OutboxFilters(kind, status, source, since, until)
    with get_db().session() as session:
        rows, _next = queries.list_outbox(session, filters, limit)
    if as_json:
        emit_json_lines(rows)
    else:
        emit_table(rows, LIST_TABLE)


@database_only
@outbox_cli.command("show")
@click.argument("message_id", metavar="ID", type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="The message as one JSON object.")
def outbox_show(message_id: int, as_json: bool) -> None:
    """Show every column of one message (ID from `outbox list`)."""
    with get_db().session() as session:
        message = queries.get_message(session, message_id)
    if message is None:
        raise click.ClickException(
            f"no outbox message with id {message_id} (never added, or pruned)"
        )
    if as_json:
        emit_json_lines([message])
        return
    width = max(len(k) for k in message)
    for key, value in message.items():
        shown = json.dumps(value, indent=2, default=str) if key in ("payload", "result") else value
        click.echo(f"{key.ljust(width)}  {'-' if shown is None else shown}")


@database_only
@outbox_cli.command("retry")
@click.argument("message_ids", metavar="[ID]...", nargs=-1, type=click.IntRange(1))
@click.option("--dead", "all_dead", is_flag=True, help="Every dead message.")
@click.option("--kind", help="With --dead: only this kind.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
def outbox_retry(message_ids, all_dead, kind, as_json) -> None:
    """Make messages due now with a fresh set of attempts (dead ones, mostly).

    A running worker picks them up at once (NOTIFY). A sent message, or one a
    worker is sending right now, is refused. Exits 1 if any was refused.
    """
    if all_dead == bool(message_ids):
        raise click.UsageError("give message IDs, or --dead [--kind K]")
    if kind and not all_dead:
        raise click.UsageError("--kind goes with --dead")
    engine = get_db().engine
    targets = outbox.dead_ids(engine, kind) if all_dead else list(message_ids)
    results = outbox.retry(engine, targets)
    for result in results:
        if as_json:
            emit_json_lines([result.to_dict()])
        else:
            click.echo(f"message {result.id}: {result.status} ({result.detail})")
    if not results and not as_json:
        click.echo("nothing to retry")
    if any(r.status == "refused" for r in results):
        raise SystemExit(1)


@database_only
@outbox_cli.command("prune")
@click.option("--older-than", required=True, help="Age of the messages to prune: 30d, 12h, 2w.")
@click.option("--include-dead", is_flag=True, help="Prune dead messages too (not only sent).")
@click.option("--dry-run", is_flag=True, help="Only count what would be pruned.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=5000,
    show_default=True,
    help="Rows per transaction.",
)
def outbox_prune(older_than: str, include_dead: bool, dry_run: bool, batch_size: int) -> None:
    """Delete sent (and, with --include-dead, dead) messages created before --older-than.

    Pending messages are never pruned. A pruned message's key can be added again.
    """
    try:
        age = queries.parse_duration(older_than)
    except queries.QueryError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    report = outbox.prune(
        get_db().engine, age, include_dead=include_dead, dry_run=dry_run, batch_size=batch_size
    )
    verb = "would prune" if dry_run else "pruned"
    dead = f" and {report.dead} dead" if include_dead else ""
    batches = "" if dry_run else f" in {report.batches} batches"
    click.echo(
        f"{verb} {report.sent} sent{dead} messages created before "
        f"{queries.iso(report.cutoff)}{batches}"
    )
