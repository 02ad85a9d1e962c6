"""``idemhook rejections``: deliveries refused before the claim (docs/operations.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from idemhook._cli.common import (
    WHEN,
    DatabaseGroup,
    database_only,
    emit_json_lines,
    emit_table,
    listing_options,
)
from idemhook._store import queries
from idemhook._store.database import get_db

rejections_cli = DatabaseGroup(
    "rejections",
    help="Deliveries refused before the claim: bad signature, timestamp, size, type, body.",
)

LIST_TABLE = (
    "id", "received_at", "source", "tenant", "error", "status_code", "count", "client_addr",
    "user_agent",
)  # fmt: skip


@database_only
@rejections_cli.command("list")
@click.option("--source", help="Only this source.")
@click.option("--code", help="Only this error code (invalid_signature, stale_timestamp, ...).")
@click.option("--since", type=WHEN, help="From this time on: 1h, 30d, or ISO 8601 (default: 24h).")
@listing_options
def rejections_list(
    source: str | None, code: str | None, since: datetime | None, limit: int, as_json: bool
) -> None:
    """List refused deliveries, newest first, and the count per source and code.

    A row whose COUNT is above 1 is a minute's last row: it stands for every refusal of
    that source past IDEMHOOK_REJECTIONS_PER_MINUTE in that minute.
    """
    since = since or datetime.now(UTC) - timedelta(hours=24)
    filters = queries.Filters(source=source, type=code, since=since)
    with get_db().session() as session:
        rows, _next = queries.list_rejections(session, filters, limit)
        counts = queries.rejection_counts(session, since, source)
    if as_json:
        emit_json_lines(rows)
        return
    if not rows:
        click.echo(f"no refused deliveries since {queries.iso(since)}")
        return
    emit_table(rows, LIST_TABLE)
    click.echo("")
    for name in sorted(counts):
        by_code = ", ".join(f"{n} {c}" for c, n in sorted(counts[name].items()))
        click.echo(f"{name}: {by_code} since {queries.iso(since)}")
