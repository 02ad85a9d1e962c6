"""``idemhook sources`` and ``idemhook sources check``: what to register at each provider.

Both work from the sources file alone, source by source, so that one broken
source (a secret whose environment variable is unset) is reported by name
instead of stopping the whole app from loading: ``sources check`` is meant for
a deploy's release phase.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from flask import current_app, has_app_context
from flask.cli import ScriptInfo, with_appcontext
from sqlalchemy import create_engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from idemhook._cli.common import ConfigMissing, needs_sources, no_database
from idemhook._config import secrets as secrets_config
from idemhook._config import settings as settings_module
from idemhook._config import sources as sources_module
from idemhook._config.reconcile import check_retention, human
from idemhook._config.schemes import SCHEMES
from idemhook._engine import registry as plugins_module
from idemhook._engine.reconcile import retention_of
from idemhook._engine.registry import Registry
from idemhook._store import refusals as pauses_store
from idemhook._store import source_secrets
from idemhook._store.database import get_db
from idemhook._values.errors import ConfigError

#: Below this many bytes of key a secret draws a warning (HMAC keys are guessable when short).
MIN_SECRET_BYTES = 16


@dataclass
class Report:
    """One source as ``idemhook sources`` shows it."""

    name: str
    url: str
    scheme: str = "?"
    event_id: str = "?"
    event_type: str = "-"
    batch: str = "one event per request"
    mode: str = "sync: handlers run in the request"
    freshness: str = "-"
    secret: str = "?"
    reconcile: str = "-"
    #: ``yes: <url>/<tenant>, ...`` for a source with ``tenants = true``.
    tenants: str = "-"
    #: One line per static secret: its position, last match and count (never its value).
    matches: list[str] = field(default_factory=list)
    paused: str = ""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _context() -> tuple[Mapping[str, Any], Registry | None]:
    """The settings, and the handler registry when the app itself could be built."""
    if has_app_context():
        return current_app.config, current_app.extensions.get("idemhook.registry")
    info = click.get_current_context().find_object(ScriptInfo)
    if info is not None:
        try:
            app = info.load_app()
            return app.config, app.extensions.get("idemhook.registry")
        except (ConfigError, click.ClickException):
            pass  # a start-up error (main() wraps it for the console): diagnosed below
    try:
        return settings_module.load(needs_database=False), None
    except ConfigError as exc:
        raise ConfigMissing(str(exc)) from None


def inspect_file(config: Any) -> list[str]:
    """What is wrong with the sources file as a whole, every problem at once.

    The mistakes ``idemhook serve`` refuses besides a source's own: unknown top-level
    keys (``plugin = [...]``), a plugin that does not import (or has no handlers), and
    ``[outbox.<kind>]`` tables with no sender or with unknown keys.
    """
    try:
        data, origin = sources_module.read(config)
    except ConfigError as exc:
        return [str(exc)]
    problems = []
    try:
        listed = sources_module.plugins_of(data, origin)
    except ConfigError as exc:
        problems.append(str(exc))
        listed = tuple(p for p in data.get("plugins", []) or () if isinstance(p, str) and p)
    registry = Registry()
    for name in listed:
        try:
            found = plugins_module.load([name], entry_points=(), migration_entry_points=())
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        registry.merge(found)
    try:
        registry.merge(plugins_module.load(()))  # the installed entry-point plugins
    except ConfigError as exc:
        problems.append(str(exc))
    outbox = data.get("outbox", {})
    if isinstance(outbox, Mapping):
        for kind, table in outbox.items():
            try:
                registry.configure_senders({kind: table})
            except (ConfigError, AttributeError) as exc:
                problems.append(
                    str(exc)
                    if isinstance(exc, ConfigError)
                    else f"[outbox.{kind}]: must be a table"
                )
    else:
        problems.append(f"{origin}: [outbox] must be a table of [outbox.<kind>] tables")
    return problems


def _tables(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        data = config
    else:
        path = Path(config)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise click.ClickException(f"IDEMHOOK_CONFIG: {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise click.ClickException(
                f"IDEMHOOK_CONFIG: {path} is not valid TOML: {exc}"
            ) from None
    tables = data.get("sources", {})
    if not isinstance(tables, Mapping):
        raise click.ClickException("IDEMHOOK_CONFIG: [sources] must be a table")
    return tables


def _recorded(config: Mapping[str, Any]) -> tuple[dict, dict, str]:
    """Static secrets' matches and tenants per source, from the database when it answers.

    ``sources`` needs no database: without one (or before ``db upgrade``) the counts are
    simply not shown, and the third value says why.
    """
    if has_app_context() and "idemhook.db" in current_app.extensions:
        engine, own = current_app.extensions["idemhook.db"].engine, False
    elif str(config.get("DATABASE_URL")) not in ("", "None", settings_module.NO_DATABASE):
        url = make_url(config["DATABASE_URL"])
        # A release gate must not hang on a database that does not answer: a few seconds.
        quick = {"connect_timeout": 3} if url.get_backend_name() == "postgresql" else {}
        engine, own = create_engine(url, connect_args=quick), True
    else:
        return {}, {}, "no DATABASE_URL"
    try:
        return source_secrets.static_matches(engine), source_secrets.tenant_counts(engine), ""
    except SQLAlchemyError as exc:
        first = (str(getattr(exc, "orig", exc)).strip().splitlines() or ["?"])[0]
        return {}, {}, f"the database did not answer ({first})"
    finally:
        if own:
            engine.dispose()


def _when(value: Any) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds")


def _describe_matches(
    report: Report, count: int, matched: Mapping[str, Any], why: str, client: str = ""
) -> None:
    """One line per static secret: when it last verified a delivery, and how many.

    ``client``: the secrets of that named client of an ``idempotency-key`` source.
    """
    for position in range(1, count + 1):
        label = f"secret {position}" if count > 1 else "secret"
        if client:
            label = f"client {client}, {label}"
        if why:
            report.matches.append(f"{label}: last match unknown ({why})")
            continue
        seen = matched.get(f"{client}:{position}" if client else str(position))
        if seen is None:
            report.matches.append(f"{label}: never matched")
        else:
            report.matches.append(
                f"{label}: last matched {_when(seen['last_matched_at'])}, "
                f"{seen['matched_count']} deliveries"
            )


def _describe_tenants(
    report: Report,
    source: sources_module.Source,
    root: str,
    tenants: int | None,
    config: Mapping[str, Any],
    why: str,
) -> None:
    url = f"{root or 'https://<your-host>'}/webhooks/{source.name}/<tenant>"
    known = f"{tenants} tenant(s) with secrets" if not why else f"tenants unknown ({why})"
    report.tenants = f"yes: {url}; {known} (`idemhook secrets list {source.name}`)"
    if not source.own_secret:
        report.url = url
        report.secret = "none of its own: each tenant's, in the database"
    try:
        secrets_config.box_of(
            config.get("IDEMHOOK_SECRETS_KEY"), needed_by=f"source {source.name!r} (tenants = true)"
        )
    except ConfigError as exc:
        report.problems.append(str(exc))


def inspect_sources() -> list[Report]:
    """Check every configured source on its own and describe it."""
    config, registry = _context()
    base = config.get("IDEMHOOK_PUBLIC_URL") or ""
    static_matches, tenant_counts, why = _recorded(config)
    reports = []
    for name, table in _tables(config["IDEMHOOK_CONFIG"]).items():
        public = table.get("public_url") if isinstance(table, Mapping) else None
        root = (public if isinstance(public, str) else base).rstrip("/")
        report = Report(name, f"{root or 'https://<your-host>'}/webhooks/{name}")
        reports.append(report)
        if not root:
            report.warnings.append(
                "no public URL: set IDEMHOOK_PUBLIC_URL (or public_url) to print the exact URL"
            )
        try:
            source = sources_module.parse_source(
                name, table, default_max_body=config["IDEMHOOK_MAX_BODY_BYTES"]
            )
        except ConfigError as exc:
            report.problems.append(str(exc))
            _describe_unloadable(report, table, str(exc))
            continue
        scheme = source.scheme
        report.scheme = scheme.name
        report.event_id = str(source.event_id)
        report.event_type = str(source.event_type) if source.event_type else "-"
        if source.batch is not None:
            where = "the body" if not source.batch.parts else str(source.batch)
            report.batch = f"a list at {where}, at most {source.max_batch}"
        if source.asynchronous:
            report.mode = _async_mode(source)
        if source.freshness is not None:
            report.freshness = (
                f"object at {source.freshness.object}, version at {source.freshness.version}: "
                "an event older than its object's applied version is stale"
            )
        path = getattr(scheme, "path", None)
        if path:  # an API (idempotency-key): its clients call its path
            report.url = f"{root or 'https://<your-host>'}{path}"
        clients = getattr(scheme, "clients", {})
        if not scheme.needs_secret:
            report.secret = "not needed"
        elif None not in clients and clients:
            report.secret = f"resolves ({len(clients)} clients: {', '.join(map(str, clients))})"
            for client, keys in clients.items():
                _warn_short(report, keys, f"clients.{client}")
                _describe_matches(report, len(keys), static_matches.get(name, {}), why, client)
        else:
            count = len(scheme.secrets)
            report.secret = "resolves" + (f" ({count} secrets, rotation)" if count > 1 else "")
            _warn_short(report, scheme.keys, "secret")
            if count:
                _describe_matches(report, count, static_matches.get(name, {}), why)
        if source.tenants:
            _describe_tenants(report, source, root, tenant_counts.get(name, 0), config, why)
        _describe_reconcile(report, source, config, registry)
        if (
            registry is not None
            and not registry.for_event(name, None)
            and not any(r.source in ("*", name) for r in registry.registrations)
        ):
            report.warnings.append("no handler: events will be recorded as ignored")
    return reports


def _describe_reconcile(
    report: Report,
    source: sources_module.Source,
    config: Mapping[str, Any],
    registry: Registry | None,
) -> None:
    """Where missed events are looked for (docs/reconcile.md), and a lookback retention
    does not cover."""
    settings = source.reconcile
    plugin = registry.reconcilers.get(source.name) if registry is not None else None
    if settings is None:
        if plugin is not None:
            report.reconcile = f"{plugin.name}, only by idemhook reconcile"
        return
    where = {
        "stripe": "Stripe's events list",
        "github": f"GitHub's deliveries of {settings.hook}",
    }.get(settings.provider, plugin.name if plugin else "no @reconciler registered")
    when = f"every {human(settings.every)}" if settings.every else "only by idemhook reconcile"
    report.reconcile = f"{where}, lookback {human(settings.lookback)}, {when}"
    try:
        check_retention({source.name: settings}, retention_of(config.get("IDEMHOOK_RETENTION")))
    except ConfigError as exc:
        report.problems.append(str(exc))


def _async_mode(source: sources_module.Source) -> str:
    """How an asynchronous source answers, orders and retries (docs/async.md)."""
    retries = source.retries
    order = f"in order per {source.order_key}" if source.order_key else "no order promised"
    return (
        f"async: answered {source.ack_status}, applied by idemhook worker, {order}, "
        f"at most {retries.max_attempts} attempts"
    )


def _warn_short(report: Report, keys: tuple[bytes, ...], setting: str) -> None:
    for index, key in enumerate(keys, start=1):
        if len(key) < MIN_SECRET_BYTES:
            which = f"{setting}[{index}]" if len(keys) > 1 else setting
            report.warnings.append(
                f"{which} is only {len(key)} bytes: a short secret can be guessed; "
                f"use at least {MIN_SECRET_BYTES} random bytes"
            )


def _spec(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _describe_unloadable(report: Report, table: Any, problem: str) -> None:
    """Fill in what the raw table (and its scheme's defaults) say, for a source that failed."""
    if not isinstance(table, Mapping):
        return
    scheme_cls = SCHEMES.get(table.get("scheme")) if isinstance(table.get("scheme"), str) else None
    settings = {**(scheme_cls.defaults if scheme_cls else {}), **table}
    report.scheme = str(table.get("scheme", "?"))
    report.event_id = _spec(settings.get("event_id", "?"))
    report.event_type = _spec(settings.get("event_type", "-"))
    batch = settings.get("batch", "none")
    if batch != "none":
        where = "the body" if batch == "array" else str(batch)
        report.batch = f"a list at {where}, at most {settings.get('max_batch', 100)}"
    if "] secret" not in problem and "] clients." not in problem:
        report.secret = "?"
    elif "is not set" in problem:
        report.secret = "does not resolve"
    else:
        report.secret = "refused"


def _show(reports: list[Report]) -> None:
    if not reports:
        click.echo("No sources are configured (IDEMHOOK_CONFIG has no [sources.<name>]).")
    for report in reports:
        click.echo(f"{report.name}\n  register   {report.url}")
        click.echo(f"  scheme     {report.scheme}")
        click.echo(f"  event id   {report.event_id}")
        click.echo(f"  event type {report.event_type}")
        click.echo(f"  batch      {report.batch}")
        click.echo(f"  mode       {report.mode}")
        click.echo(f"  freshness  {report.freshness}")
        click.echo(f"  secret     {report.secret}")
        for line in report.matches:
            click.echo(f"    {line}")
        if report.tenants != "-":
            click.echo(f"  tenants    {report.tenants}")
        if report.reconcile != "-":
            click.echo(f"  reconcile  {report.reconcile}")
        if report.paused:
            click.echo(f"  PAUSED     {report.paused}")
        for problem in report.problems:
            click.echo(f"  PROBLEM    {problem}")
        for warning in report.warnings:
            click.echo(f"  warning    {warning}")


@no_database
@click.group(
    "sources",
    invoke_without_command=True,
    short_help="What to register at each provider; `check` for a release phase.",
)
@click.pass_context
def sources_cli(ctx: click.Context) -> None:
    """List the configured sources: the URL to register, scheme, ID, type, secret status."""
    if ctx.invoked_subcommand is None:
        config, _registry = _context()
        _show_file(inspect_file(config["IDEMHOOK_CONFIG"]))
        reports = inspect_sources()
        _note_pauses(reports, config.get("DATABASE_URL"))
        _show(reports)


def _note_pauses(reports: list[Report], url: Any) -> None:
    """Mark the paused sources, when there is a database to ask (the listing needs none)."""
    if not url or str(url) == settings_module.NO_DATABASE:
        return
    try:
        found = pauses_store.pauses_at(url)
    except Exception:  # noqa: BLE001 (the listing works from the sources file alone)
        return
    for report in reports:
        pause = found.get(report.name)
        if pause is not None:
            report.paused = _pause_text(pause)


def _pause_text(pause: Mapping[str, Any]) -> str:
    text = f"since {pause['paused_at']}"
    if pause.get("by"):
        text += f" by {pause['by']}"
    if pause.get("reason"):
        text += f": {pause['reason']}"
    return text + "; deliveries are recorded and wait for `idemhook sources resume`"


def _show_file(problems: list[str]) -> None:
    if problems:
        click.echo("the sources file")
    for problem in problems:
        click.echo(f"  PROBLEM    {problem}")


@no_database
@sources_cli.command("check")
def check_command() -> None:
    """Exit non-zero if the sources file or any source has a problem (a release phase's gate).

    Every mistake ``idemhook serve`` refuses is reported, all at once: unknown keys at
    the top level, in a source or in an ``[outbox.<kind>]`` table, plugins that do not
    import, secrets that do not resolve. Needs no database.
    """
    config, _registry = _context()
    file_problems = inspect_file(config["IDEMHOOK_CONFIG"])
    _show_file(file_problems)
    reports = inspect_sources()
    _show(reports)
    broken = [r.name for r in reports if r.problems]
    if broken or file_problems:
        parts = []
        if file_problems:
            parts.append(f"{len(file_problems)} problem(s) in the sources file")
        if broken:
            parts.append(f"{len(broken)} source(s) with problems: {', '.join(broken)}")
        raise click.ClickException("; ".join(parts))
    click.echo(f"ok: {len(reports)} source(s)")


def _webhook_source(name: str) -> None:
    sources = current_app.extensions["idemhook.receiver"].sources
    source = sources.get(name)
    if source is None or source.scheme.operation:
        known = ", ".join(sorted(n for n, s in sources.items() if not s.scheme.operation))
        raise click.ClickException(
            f"no webhook source named {name!r} is configured (sources: {known or 'none'})"
        )


@needs_sources
@sources_cli.command("pause")
@click.argument("source")
@click.option("--reason", help="Why, shown by `idemhook sources` and the dashboard.")
@click.option("--by", "by", help="Who paused it (default: $USER).")
@with_appcontext
def pause_command(source: str, reason: str | None, by: str | None) -> None:
    """Pause SOURCE: its deliveries are verified, recorded as received and answered at
    once, without running handlers, until `idemhook sources resume SOURCE`.

    Every process of every instance sees the pause within a second.
    """
    _webhook_source(source)
    who = by or os.environ.get("USER") or None
    if pauses_store.pause(get_db().engine, source, datetime.now(UTC), who, reason):
        click.echo(
            f"paused {source}: its deliveries are recorded and answered without running "
            f"handlers; `idemhook sources resume {source}` lets `idemhook worker` apply them"
        )
    else:
        click.echo(f"{source} was paused already")


@needs_sources
@sources_cli.command("resume")
@click.argument("source")
@with_appcontext
def resume_command(source: str) -> None:
    """Resume SOURCE: `idemhook worker` applies the deliveries received during the pause,
    in receipt order, each once; new deliveries run their handlers again."""
    _webhook_source(source)
    if pauses_store.resume(get_db().engine, source):
        click.echo(
            f"resumed {source}: `idemhook worker` applies what was received while it was "
            "paused, in receipt order"
        )
    else:
        click.echo(f"{source} was not paused")
