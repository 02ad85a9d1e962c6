"""Shared pieces of the query commands: time options, output, database errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import click
from flask.cli import AppGroup
from sqlalchemy.exc import DBAPIError

from idemhook._store.engine import (
    is_disconnect,
)
from idemhook._store.queries import DEFAULT_LIMIT, MAX_LIMIT, QueryError, parse_when

#: Attribute saying what a command needs built (read by the console script's app factory).
NEEDS_ATTRIBUTE = "idemhook_needs"
CommandT = TypeVar("CommandT", bound=click.Command)


class ConfigMissing(click.ClickException):
    """A setting or the sources file a command needs is missing or wrong: one line, exit 2."""

    exit_code = 2


def _needs(command: CommandT, *needs: str) -> CommandT:
    setattr(command, NEEDS_ATTRIBUTE, frozenset(getattr(command, NEEDS_ATTRIBUTE, ())) | set(needs))
    return command


def database_only(command: CommandT) -> CommandT:
    """Mark a read-only command: it needs DATABASE_URL and nothing else.

    No sources file is read and no plugin imported, so looking at the tables never
    requires every provider's secret.
    """
    return _needs(command, "database only")


def migrations_only(command: CommandT) -> CommandT:
    """Mark an ``idemhook db`` command: DATABASE_URL and the plugins' migrations only.

    The sources file is read for its ``plugins`` list alone: no source is parsed, so no
    provider's secret is needed (a release phase or CI can migrate without them).
    """
    return _needs(command, "migrations only")


def no_database(command: CommandT) -> CommandT:
    """Mark a command that never touches the database: DATABASE_URL may be unset."""
    return _needs(command, "no database")


def needs_sources(command: CommandT) -> CommandT:
    """Mark a command that works on configured sources: a missing sources file is an error."""
    return _needs(command, "sources file")


# SQLSTATE 42P01 undefined_table / 42703 undefined_column: the schema is missing or behind.
_SCHEMA_CODES = ("42P01", "42703")


class DatabaseGroup(AppGroup):
    """A command group that turns an unusable database into one clear line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DBAPIError as exc:
            first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            if is_disconnect(exc):
                raise click.ClickException(
                    f"cannot reach the database ({first}); check DATABASE_URL and that the "
                    "server is up"
                ) from None
            if getattr(exc.orig, "pgcode", None) in _SCHEMA_CODES or "no such" in first:
                raise click.ClickException(
                    f"the database schema is missing or behind ({first}); run `idemhook db upgrade`"
                ) from None
            raise


class When(click.ParamType):
    """A point in time: ``2h``, ``30d``, ``15m`` ago, or ISO 8601 (``2026-11-01T00:00Z``)."""

    name = "when"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(str(value))
        except QueryError as exc:
            self.fail(str(exc), param, ctx)


WHEN = When()


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--source, --type, --since, --until."""
    for option in reversed(
        [
            click.option("--source", help="Only this source."),
            click.option("--type", "event_type", help="Only this event type (exact)."),
            click.option("--since", type=WHEN, help="From this time on: 2h, 30d, or ISO 8601."),
            click.option("--until", type=WHEN, help="Before this time: 2h, 30d, or ISO 8601."),
        ]
    ):
        func = option(func)
    return func


def listing_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--limit (a page of rows) and --json (one object per line), as every listing has."""
    func = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")(func)
    return click.option(
        "--limit",
        type=click.IntRange(1, MAX_LIMIT),
        default=DEFAULT_LIMIT,
        show_default=True,
    )(func)


def emit_json_lines(rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        click.echo(json.dumps(row, ensure_ascii=False, default=str))


def emit_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned table; long values are cut so a row stays on one line."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def echo_traceback(traceback: str | None, indent: str = "") -> None:
    """Print a stored traceback as it was recorded, each line indented."""
    if traceback:
        for line in traceback.rstrip("\n").splitlines():
            click.echo(f"{indent}{line}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
