"""The sources file (``IDEMHOOK_CONFIG``): which senders exist and how each is verified.

Parsed once at start-up into immutable :class:`Source` objects; every mistake
raises :class:`~idemhook._values.errors.ConfigError` naming the source and the key.
See ``docs/configuration.md`` for every key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idemhook._config import freshness as freshness_
from idemhook._config import locators
from idemhook._config.freshness import Freshness
from idemhook._config.locators import Locator
from idemhook._config.reconcile import ReconcileConfig
from idemhook._config.reconcile import parse as parse_reconcile
from idemhook._config.schemes import SCHEMES, Scheme
from idemhook._config.settings import check_public_url
from idemhook._values.errors import ConfigError

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A tenant's name (``POST /webhooks/<source>/<tenant>``): 1-64 letters, digits, ``.``,
#: ``_``, ``-`` or ``@``; never ``:``, which separates it from the event ID it scopes.
TENANT_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def valid_tenant(name: str) -> bool:
    """Whether ``name`` can be a tenant's name."""
    return TENANT_NAME.fullmatch(name) is not None


COMMON_KEYS = frozenset(
    {
        "scheme",
        "secret",
        "event_id",
        "event_type",
        "batch",
        "max_batch",
        "max_body_bytes",
        "content_types",
        "allow_unverified",
        "public_url",
        "mode",
        "ack_status",
        "order_key",
        "max_attempts",
        "backoff_seconds",
        "max_backoff_seconds",
        "reconcile",
        "freshness",
        "tenants",
    }
)
#: The keys that only an asynchronous source (``mode = "async"``) reads.
ASYNC_KEYS = ("ack_status", "order_key", "max_attempts", "backoff_seconds", "max_backoff_seconds")
MODES = ("sync", "async")
#: What an asynchronous source may answer a delivery it accepted with.
ACK_STATUSES = (202, 200)
DEFAULT_CONTENT_TYPES = ("application/json",)
DEFAULT_MAX_BATCH = 100


@dataclass(frozen=True, slots=True)
class Retries:
    """How ``idemhook worker`` retries an asynchronous source's failed events.

    The same policy and defaults as an outbox sender's (docs/outbox.md): the wait
    after failed attempt *n* is ``min(max_backoff, backoff x 2^(n-1))``, its upper
    half drawn at random; after ``max_attempts`` failures the event is ``failed``.
    """

    max_attempts: int = 10
    backoff_seconds: float = 5.0
    max_backoff_seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class Source:
    """One ``[sources.<name>]`` table, resolved and validated."""

    name: str
    scheme: Scheme
    event_id: Locator
    event_type: Locator | None
    #: Where the list of events is (``batch = "array"`` is the body itself); None: one event.
    batch: Locator | None
    max_batch: int
    max_body_bytes: int
    content_types: tuple[str, ...]
    #: Base URL the sender calls (overrides IDEMHOOK_PUBLIC_URL for this source).
    public_url: str | None = None
    #: ``mode = "async"``: deliveries are claimed and answered at once; ``idemhook
    #: worker`` runs the handlers (docs/async.md).
    asynchronous: bool = False
    #: What an accepted asynchronous delivery is answered with (202, or 200).
    ack_status: int = 202
    #: Where an asynchronous event's order key is: events with equal keys are applied
    #: one at a time, in the order they were received. None: no order promised.
    order_key: Locator | None = None
    #: The worker's retries of an asynchronous source's failed events.
    retries: Retries = field(default_factory=Retries)
    #: ``[sources.<name>.reconcile]``: where missed events are looked for (docs/reconcile.md).
    reconcile: ReconcileConfig | None = None
    #: ``[sources.<name>.freshness]``: where each event's object and version are; an
    #: event older than its object's applied version is ``stale``. None: no check.
    freshness: Freshness | None = None
    #: ``tenants = true``: also served at ``POST /webhooks/<name>/<tenant>``, each tenant
    #: verified against its own secrets, kept (encrypted) in ``source_secrets``.
    tenants: bool = False

    @property
    def own_secret(self) -> bool:
        """Whether ``POST /webhooks/<name>`` is served: the source has a secret of its own,
        or needs none (a source with tenants and no ``secret`` serves only its tenants)."""
        return not self.tenants or bool(self.scheme.keys)


@dataclass(frozen=True, slots=True)
class SourcesFile:
    plugins: tuple[str, ...]
    sources: Mapping[str, Source]
    #: ``[outbox.<kind>]`` tables: a sender's retry policy set here (app.plugins).
    outbox: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def read(config: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The sources file's parsed content (or an already-parsed dict, from tests) and its name."""
    if isinstance(config, Mapping):
        data: Mapping[str, Any] = config
        origin = "the given config"
    else:
        path = Path(config)
        origin = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"IDEMHOOK_CONFIG: {path} does not exist; copy webhooks.example.toml to start"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"IDEMHOOK_CONFIG: {path} is not valid TOML: {exc}") from None
    return data, origin


#: The keys a sources file may have at its top level.
TOP_LEVEL_KEYS = ("plugins", "sources", "outbox")


def plugins_of(data: Mapping[str, Any], origin: str) -> tuple[str, ...]:
    """The file's ``plugins`` list, after checking its top-level keys; nothing else is read.

    What ``idemhook db upgrade`` needs (the plugins' own migrations), without any
    source's secret.
    """
    unknown = set(data) - set(TOP_LEVEL_KEYS)
    if unknown:
        hint = " (did you mean plugins?)" if "plugin" in unknown else ""
        raise ConfigError(
            f"{origin}: unknown top-level key(s) {', '.join(sorted(unknown))}{hint}; "
            f"the keys are {', '.join(TOP_LEVEL_KEYS)}"
        )
    plugins = data.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
        raise ConfigError(f"{origin}: plugins must be a list of module names")
    return tuple(plugins)


def load(config: str | Path | Mapping[str, Any], *, max_body_bytes: int) -> SourcesFile:
    """Read and validate the sources file (or an already-parsed dict, from tests)."""
    data, origin = read(config)
    plugins = plugins_of(data, origin)
    tables = data.get("sources", {})
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{origin}: [sources] must be a table of [sources.<name>] tables")
    sources = {
        name: _source(name, table, default_max_body=max_body_bytes)
        for name, table in tables.items()
    }
    outbox = data.get("outbox", {})
    if not isinstance(outbox, Mapping) or not all(isinstance(t, Mapping) for t in outbox.values()):
        raise ConfigError(f"{origin}: [outbox] must be a table of [outbox.<kind>] tables")
    return SourcesFile(plugins=tuple(plugins), sources=sources, outbox=outbox)


def parse_source(name: str, table: Any, *, default_max_body: int) -> Source:
    """Validate one ``[sources.<name>]`` table (``idemhook sources`` checks them one by one)."""
    return _source(name, table, default_max_body=default_max_body)


def _source(name: str, table: Any, *, default_max_body: int) -> Source:
    if not SOURCE_NAME.match(name):
        raise ConfigError(
            f"[sources.{name}]: a source name is 1-64 letters, digits, '.', '_' or '-' "
            "(it becomes part of the URL)"
        )
    if not isinstance(table, Mapping):
        raise ConfigError(f"[sources.{name}] must be a table")
    scheme_name = table.get("scheme")
    scheme_cls = SCHEMES.get(scheme_name) if isinstance(scheme_name, str) else None
    if scheme_cls is None:
        raise ConfigError(
            f"[sources.{name}] scheme: unknown scheme {scheme_name!r}; "
            f"choose one of {', '.join(sorted(SCHEMES))}"
        )
    unknown = set(table) - COMMON_KEYS - scheme_cls.option_keys
    if unknown:
        raise ConfigError(
            f"[sources.{name}]: unknown key(s) {', '.join(sorted(unknown))} "
            f"for scheme {scheme_name!r}"
        )
    if "allow_unverified" in table and not isinstance(table["allow_unverified"], bool):
        raise ConfigError(f"[sources.{name}] allow_unverified: must be true or false")
    tenants = table.get("tenants", False)
    if not isinstance(tenants, bool):
        raise ConfigError(f"[sources.{name}] tenants: must be true or false")
    if tenants and not scheme_cls.serves_tenants:
        raise ConfigError(
            f"[sources.{name}] tenants: a {scheme_name} source cannot have tenants; tenants "
            "are for providers that sign each customer's deliveries with its own secret"
        )
    if tenants and table.get("freshness") is not None:
        raise ConfigError(
            f"[sources.{name}] tenants: [sources.{name}.freshness] compares versions per object "
            "across the whole source, and tenants' objects may share keys; a source with "
            "tenants cannot have freshness yet"
        )
    if tenants and "reconcile" in table:
        raise ConfigError(
            f"[sources.{name}] tenants: a reconcile run reads one provider account's log; "
            "a source with tenants cannot have [sources.{name}.reconcile]"
        )
    settings = {**scheme_cls.defaults, **table}
    scheme = scheme_cls(name, settings)

    if "event_id" not in settings:
        raise ConfigError(f'[sources.{name}] event_id: missing; e.g. event_id = "body:id"')
    event_id = locators.parse(settings["event_id"], source=name, key="event_id")
    event_type = (
        locators.parse(settings["event_type"], source=name, key="event_type")
        if settings.get("event_type") is not None
        else None
    )
    batch_spec = settings.get("batch", "none")
    if batch_spec == "none":
        batch = None
    elif batch_spec == "array":
        batch = locators.BodyPath(())
    else:
        batch = locators.parse(batch_spec, source=name, key="batch")
        if not isinstance(batch, locators.BodyPath):
            raise ConfigError(f"[sources.{name}] batch: must be 'none', 'array' or 'body:<path>'")

    asynchronous = _mode(settings, name) == "async"
    if asynchronous and scheme.operation:
        raise ConfigError(
            f'[sources.{name}] mode = "async": an {scheme_name} source answers with its '
            "operation's own result, which only its handler can give; it runs in the request"
        )
    reconcile = None
    if "reconcile" in table:
        if scheme.operation:
            raise ConfigError(
                f"[sources.{name}.reconcile]: an {scheme_name} source is an API of your own; "
                "there is no provider log to reconcile from"
            )
        reconcile = parse_reconcile(name, scheme_name, table["reconcile"])
    freshness = None
    if settings.get("freshness") is not None:
        if scheme.operation:
            raise ConfigError(
                f"[sources.{name}.freshness]: an {scheme_name} source runs each request's "
                "operation for its client; freshness is for providers' events about objects"
            )
        freshness = freshness_.parse(settings["freshness"], source=name)
    return Source(
        name=name,
        scheme=scheme,
        event_id=event_id,
        event_type=event_type,
        batch=batch,
        max_batch=_positive_int(settings, "max_batch", DEFAULT_MAX_BATCH, name),
        max_body_bytes=_positive_int(settings, "max_body_bytes", default_max_body, name),
        content_types=_content_types(settings, name),
        public_url=_public_url(settings, name),
        asynchronous=asynchronous,
        reconcile=reconcile,
        freshness=freshness,
        tenants=tenants,
        **(_async_settings(settings, name) if asynchronous else {}),
    )


def _mode(settings: Mapping[str, Any], source: str) -> str:
    mode = settings.get("mode", "sync")
    if mode not in MODES:
        raise ConfigError(
            f'[sources.{source}] mode: "sync" (handlers run in the request, the default) or '
            f'"async" (answered at once, handlers run by idemhook worker), got {mode!r}'
        )
    if mode == "sync":
        given = [key for key in ASYNC_KEYS if key in settings]
        if given:
            raise ConfigError(
                f"[sources.{source}] {', '.join(given)}: only an asynchronous source reads "
                f'{"this key" if len(given) == 1 else "these keys"}; set mode = "async" '
                "(docs/async.md) or remove them"
            )
    return mode


def _async_settings(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The keys of an asynchronous source (docs/configuration.md), checked."""
    ack_status = settings.get("ack_status", ACK_STATUSES[0])
    if isinstance(ack_status, bool) or ack_status not in ACK_STATUSES:
        raise ConfigError(
            f"[sources.{source}] ack_status: 202 (the default) or 200 (for providers that "
            f"want 200), got {ack_status!r}"
        )
    order_key = (
        locators.parse(settings["order_key"], source=source, key="order_key")
        if settings.get("order_key") is not None
        else None
    )
    defaults = Retries()
    retries = Retries(
        max_attempts=_positive_int(settings, "max_attempts", defaults.max_attempts, source),
        backoff_seconds=_positive_number(
            settings, "backoff_seconds", defaults.backoff_seconds, source
        ),
        max_backoff_seconds=_positive_number(
            settings, "max_backoff_seconds", defaults.max_backoff_seconds, source
        ),
    )
    return {"ack_status": ack_status, "order_key": order_key, "retries": retries}


def _positive_number(settings: Mapping[str, Any], key: str, default: float, source: str) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"[sources.{source}] {key}: must be a positive number of seconds")
    return float(value)


def _public_url(settings: Mapping[str, Any], source: str) -> str | None:
    value = settings.get("public_url")
    if value is None:
        return None
    problem = check_public_url(value)
    if problem:
        raise ConfigError(f"[sources.{source}] public_url: {problem}")
    return value.rstrip("/")


def _positive_int(settings: Mapping[str, Any], key: str, default: int, source: str) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"[sources.{source}] {key}: must be a positive whole number")
    return value


def _content_types(settings: Mapping[str, Any], source: str) -> tuple[str, ...]:
    value = settings.get("content_types", DEFAULT_CONTENT_TYPES)
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, str) and "/" in v for v in value)
    ):
        raise ConfigError(
            f"[sources.{source}] content_types: a list of media types like 'application/json'"
        )
    return tuple(v.lower() for v in value)
