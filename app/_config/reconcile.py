"""``[sources.<name>.reconcile]``: which provider log a source is reconciled from, how far
back each run looks and how often ``idemhook worker`` runs it (docs/reconcile.md).

Checked at start-up, every mistake naming the source: an unknown key, a missing API key
or token (a literal or ``env:NAME``, resolved here and never shown), a malformed
duration or hook, and a ``lookback`` that retention (``IDEMHOOK_RETENTION``) does not
cover: a claim pruned while its event is still inside the lookback would let the run
apply that event again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from idemhook._config.schemes.base import resolve_secrets
from idemhook._values.durations import QueryError, parse_duration
from idemhook._values.errors import ConfigError

#: The providers with a built-in reconciler, by the scheme of their sources.
STRIPE = "stripe"
GITHUB = "github"
#: A source reconciled by a plugin's ``@reconciler`` function.
PLUGIN = "plugin"

DEFAULT_API_BASE = {STRIPE: "https://api.stripe.com", GITHUB: "https://api.github.com"}
KEYS = {
    STRIPE: ("api_key", "api_base", "lookback", "every"),
    GITHUB: ("token", "hook", "api_base", "lookback", "every"),
    PLUGIN: ("lookback", "every"),
}
#: The setting that holds each provider's credential.
CREDENTIAL = {STRIPE: "api_key", GITHUB: "token"}
DEFAULT_LOOKBACK = timedelta(days=3)
#: How far back Stripe's events list reaches.
STRIPE_MAX_LOOKBACK = timedelta(days=30)
#: The shortest ``every``: a run asks the provider for the whole lookback each time.
MIN_EVERY = timedelta(seconds=1)
_HOOK = re.compile(r"^(repos/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+|orgs/[A-Za-z0-9_.-]+)/hooks/\d+$")


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    """One source's reconcile settings, resolved and checked."""

    source: str
    #: ``stripe``, ``github`` or ``plugin``.
    provider: str
    lookback: timedelta = DEFAULT_LOOKBACK
    #: How often ``idemhook worker`` runs it; None: only ``idemhook reconcile`` does.
    every: timedelta | None = None
    api_base: str = ""
    #: The API key or token; never logged, shown or stored.
    credential: str = field(default="", repr=False)
    #: GitHub: ``repos/OWNER/REPO/hooks/ID`` or ``orgs/ORG/hooks/ID``.
    hook: str = ""


def provider_of(scheme: str) -> str:
    """The reconciler a source of ``scheme`` gets: built in for Stripe and GitHub."""
    return scheme if scheme in (STRIPE, GITHUB) else PLUGIN


def parse(source: str, scheme: str, table: Any) -> ReconcileConfig:
    """Validate ``[sources.<source>.reconcile]`` for a source of ``scheme``."""
    where = f"[sources.{source}.reconcile]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    provider = provider_of(scheme)
    allowed = KEYS[provider]
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        what = f"a {scheme} source" if provider != PLUGIN else "a source reconciled by a plugin"
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} for {what} (known: {', '.join(allowed)})"
        )
    lookback = duration(table.get("lookback"), DEFAULT_LOOKBACK, f"{where} lookback")
    if provider == STRIPE and lookback > STRIPE_MAX_LOOKBACK:
        raise ConfigError(
            f"{where} lookback: Stripe lists events of the last 30 days at most, got "
            f"{table['lookback']!r}"
        )
    every = None
    if table.get("every") is not None:
        every = duration(table["every"], None, f"{where} every")
        if every < MIN_EVERY:
            raise ConfigError(f"{where} every: at least 1s")
    if provider == PLUGIN:
        return ReconcileConfig(source, provider, lookback, every)
    api_base = _api_base(table.get("api_base", DEFAULT_API_BASE[provider]), where)
    key = CREDENTIAL[provider]
    if table.get(key) is None:
        what = (
            "a restricted key that can read events"
            if provider == STRIPE
            else "a token that can read the hook's deliveries"
        )
        raise ConfigError(
            f"{where} {key}: missing; give a literal or env:NAME ({what}, docs/reconcile.md)"
        )
    if isinstance(table[key], list):
        raise ConfigError(f"{where} {key}: one {key}, not a list")
    (credential,) = resolve_secrets(source, table[key], key=f"reconcile.{key}")
    hook = ""
    if provider == GITHUB:
        hook = table.get("hook")
        if not isinstance(hook, str) or not _HOOK.match(hook.strip("/")):
            raise ConfigError(
                f"{where} hook: 'repos/OWNER/REPO/hooks/HOOK_ID' or 'orgs/ORG/hooks/HOOK_ID' "
                f"(the hook's ID is the number at the end of its settings page's URL), got {hook!r}"
            )
        hook = hook.strip("/")
    return ReconcileConfig(source, provider, lookback, every, api_base, credential, hook)


def duration(value: Any, default: timedelta | None, where: str) -> timedelta:
    """A positive duration like ``15m``, ``6h``, ``3d``."""
    if value is None:
        if default is None:
            raise ConfigError(f"{where}: missing; a duration like '15m', '6h' or '3d'")
        return default
    try:
        parsed = parse_duration(value) if isinstance(value, str) else None
    except QueryError:
        parsed = None
    if parsed is None or parsed <= timedelta(0):
        raise ConfigError(f"{where}: a duration like '15m', '6h' or '3d', got {value!r}")
    return parsed


#: Hosts ``api_base`` may name with plain ``http://`` (a local fake, a local proxy).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _api_base(value: Any, where: str) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if (
        parts is None
        or parts.scheme not in ("https", "http")
        or not parts.netloc
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"{where} api_base: a base URL like 'https://api.example.com', got {value!r}"
        )
    if parts.scheme == "http" and parts.hostname not in LOCAL_HOSTS:
        # The API key or token travels in every request's Authorization header.
        raise ConfigError(
            f"{where} api_base: https:// (the key or token is sent with every request); "
            f"plain http:// only to {', '.join(LOCAL_HOSTS)}, got {value!r}"
        )
    return value.rstrip("/")


def check_retention(configs: Mapping[str, ReconcileConfig], retention: timedelta | None) -> None:
    """Refuse a lookback that retention does not cover (docs/reconcile.md#retention)."""
    if retention is None:
        return
    for config in configs.values():
        if config.lookback >= retention:
            raise ConfigError(
                f"[sources.{config.source}.reconcile] lookback: {human(config.lookback)} is not "
                f"shorter than IDEMHOOK_RETENTION ({human(retention)}): an event whose claim "
                "was pruned while still inside the lookback would be applied again; shorten "
                "lookback or keep claims longer"
            )


def human(value: timedelta) -> str:
    """``value`` as the sources file writes it: ``3d``, ``15m``, ``90s``."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
