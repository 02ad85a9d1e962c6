"""``idemhook objects``: the newest version applied to an object (sources with freshness)."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from idemhook._cli.common import DatabaseGroup, database_only, emit_json_lines
from idemhook._store import object_versions, queries
from idemhook._store.database import get_db

objects_cli = DatabaseGroup(
    "objects",
    help="The version applied to each object of a source with freshness; prune old ones.",
)


@database_only
@objects_cli.command("show")
@click.argument("source")
@click.argument("object_key", metavar="OBJECT")
@click.option("--json", "as_json", is_flag=True, help="The object as one JSON object.")
def objects_show(source: str, object_key: str, as_json: bool) -> None:
    """Print the version applied to OBJECT of SOURCE, and the event that applied it.

    OBJECT is the object's key as its source's freshness.object reads it (the parts of a
    list joined with ':'). An event of OBJECT at or below this version is stale.
    """
    with get_db().engine.connect() as conn:
        found = object_versions.show(conn, source, object_key)
    shown = None if found is None else queries.object_view(found)
    if shown is None or shown["event_id"] is None:
        floor = shown["floor"] if shown is not None else None
        below = (
            f"; events of {source!r} at or below version {floor['version']} are stale (the "
            f"floor left by objects prune)"
            if floor
            else ""
        )
        raise click.ClickException(
            f"no version is recorded for object {object_key!r} of source {source!r}: none of "
            f"its events was applied yet, its source has no freshness, or it was pruned{below}"
        )
    if as_json:
        emit_json_lines([shown])
        return
    width = len("applied_at")
    for key in ("source", "object_key", "version", "event_id", "applied_at"):
        click.echo(f"{key.ljust(width)}  {shown[key]}")
    status = shown["event_status"]
    click.echo(f"{'status'.ljust(width)}  {status or '- (its claim was pruned)'}")
    floor = shown["floor"]
    if floor is not None:
        click.echo(
            f"{'floor'.ljust(width)}  {floor['version']} (event {floor['event_id']}, pruned "
            f"{floor['pruned_at']}): any event of {source!r} at or below it is stale"
        )


@database_only
@objects_cli.command("prune")
@click.option(
    "--older-than",
    required=True,
    help="Delete objects last applied longer ago than this: 90d, 52w.",
)
@click.option("--source", help="Only this source's objects.")
@click.option("--dry-run", is_flag=True, help="Only count what would be pruned.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 5000),
    default=500,
    show_default=True,
    help="Objects per transaction.",
)
def objects_prune(older_than: str, source: str | None, dry_run: bool, batch_size: int) -> None:
    """Delete the versions of objects no event has been applied to for --older-than.

    Each source's floor rises to the newest version pruned: from then on, an event at or
    below it is stale whatever its object, so pruning never lets an old event apply (see
    docs/querying.md#retention-of-object-versions for the trade-off).
    """
    try:
        cutoff = datetime.now(UTC) - queries.parse_duration(older_than)
    except queries.QueryError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    report = object_versions.prune(
        get_db().engine, cutoff, source=source, dry_run=dry_run, batch_size=batch_size
    )
    if dry_run:
        click.echo(
            f"would prune {report.objects} objects last applied before {queries.iso(cutoff)}"
        )
        return
    floors = ", ".join(f"{name}: {v:f}" for name, v in sorted(report.floors.items()))
    click.echo(
        f"pruned {report.objects} objects last applied before {queries.iso(cutoff)} in "
        f"{report.batches} batches" + (f"; floors now {floors}" if floors else "")
    )
