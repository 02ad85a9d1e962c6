"""Process settings: defaults, then the environment, then the dict a test passes.

Every key is documented in ``docs/configuration.md``. The sources file named by
``IDEMHOOK_CONFIG`` is read by :mod:`idemhook._config.sources`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from idemhook._values.errors import ConfigError

#: IDEMHOOK_POOL_MODE values (app.db).
POOL_MODES = ("keep", "session-pooler")

DEFAULTS: dict[str, Any] = {
    # Required; no default so that we never silently use another database.
    "DATABASE_URL": None,
    # Path of the TOML sources file, or (from tests) the parsed dict itself.
    "IDEMHOOK_CONFIG": "webhooks.toml",
    # Largest accepted request body, unless a source sets max_body_bytes.
    "IDEMHOOK_MAX_BODY_BYTES": 1024 * 1024,
    # Per-statement and lock-wait bound for every transaction (PostgreSQL, SET LOCAL);
    # busy-wait bound on SQLite. Well under the 5 s that HubSpot and Shopify wait.
    "IDEMHOOK_STATEMENT_TIMEOUT_MS": 2000,
    # Longest one event's handlers may run before the delivery is answered 503
    # handler_timeout and rolled back. 0: twice IDEMHOOK_STATEMENT_TIMEOUT_MS.
    "IDEMHOOK_HANDLER_TIMEOUT_MS": 0,
    # The application_name of every database connection this process opens, as
    # pg_stat_activity shows it. Empty: by role, "idemhook-web" (the web app),
    # "idemhook-worker" (`idemhook worker`), "idemhook-cli" (every other command).
    "IDEMHOOK_APPLICATION_NAME": "",
    # Connections kept per worker process.
    "IDEMHOOK_POOL_SIZE": 4,
    # "keep": keep connections (direct, or a transaction-mode pooler such as PgBouncer's
    # pool_mode = transaction); "session-pooler": hold one only while a delivery uses it.
    "IDEMHOOK_POOL_MODE": "keep",
    # Prepare the claim's and the keys' statements once per kept connection (PostgreSQL).
    # Only for a connection that is always the same server session: directly to
    # PostgreSQL, never through a transaction-mode pooler (docs/configuration.md).
    "IDEMHOOK_PREPARED_STATEMENTS": False,
    # Direct database URL for `idemhook db` commands (managed databases hand out a
    # pooled and a direct URL); empty: DATABASE_URL.
    "IDEMHOOK_MIGRATION_DATABASE_URL": "",
    # Bearer token of the read API (GET /events, /failures) and the dashboard's login;
    # unset: both answer 404.
    "IDEMHOOK_ADMIN_TOKEN": None,
    # Key that signs the dashboard's session cookie; unset: derived from the admin token.
    "IDEMHOOK_SECRET_KEY": None,
    # Keys that encrypt tenants' secrets at rest (docs/configuration.md#tenants): Fernet
    # keys, comma-separated; the first encrypts, every one decrypts. Required once a source
    # has tenants = true. Never logged or shown.
    "IDEMHOOK_SECRETS_KEY": "",
    # Whether GET /metrics answers without the admin token (when one is set).
    "IDEMHOOK_METRICS_PUBLIC": True,
    # Per-event log lines as "text" or "json".
    "IDEMHOOK_LOG_FORMAT": "text",
    # Base URL providers call (https://hooks.example.com): shown by `idemhook sources`
    # and used as the signed URL by schemes that sign it (HubSpot). Empty: the request's own.
    "IDEMHOOK_PUBLIC_URL": "",
    # Where docs/ is published for the clients of idempotency-key sources: the `type` of
    # their problem details links into it. Empty: the relative docs/idempotency-keys.md#...
    "IDEMHOOK_DOCS_URL": "",
    # Number of reverse proxies in front whose X-Forwarded-* headers are trusted
    # (werkzeug ProxyFix). 0: ignore them, as anyone can send them.
    "IDEMHOOK_TRUSTED_PROXIES": 0,
    # `idemhook worker`: how often it looks for due work when no NOTIFY woke it.
    "IDEMHOOK_WORKER_POLL_MS": 1000,
    # `idemhook worker`: most outbox messages (or received events) taken in one transaction.
    "IDEMHOOK_WORKER_BATCH": 50,
    # `idemhook worker`: longest one received event's handlers may run (asynchronous
    # sources, docs/async.md): far above the provider's few seconds, which no longer apply.
    "IDEMHOOK_WORKER_HANDLER_TIMEOUT_MS": 60000,
    # How long claims are kept (what the scheduled `events prune --older-than` uses): its
    # default, and longer than every reconcile lookback (docs/reconcile.md). Empty: not said.
    "IDEMHOOK_RETENTION": "",
    # Refused deliveries recorded per source and minute in rejected_deliveries; the rest
    # of the minute's refusals are counted in one more row (docs/operations.md).
    "IDEMHOOK_REJECTIONS_PER_MINUTE": 60,
    # `idemhook worker`: the URL it LISTENs on (a direct or session-mode connection);
    # empty: DATABASE_URL; "off": no LISTEN, polling only (docs/outbox.md).
    "IDEMHOOK_WORKER_LISTEN_URL": "",
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


#: What a command that uses no database is built on when DATABASE_URL is unset: an
#: in-memory SQLite database that nothing ever connects to (``idemhook sign``, ``send``,
#: ``sources``, ``sources check``, ``handlers list``).
NO_DATABASE = "sqlite://"


def load(
    test_config: Mapping[str, Any] | None = None, *, needs_database: bool = True
) -> dict[str, Any]:
    """Return the settings: defaults < environment < ``test_config``.

    ``needs_database=False``: a command that never touches the database; an unset
    ``DATABASE_URL`` is then :data:`NO_DATABASE` instead of an error.
    """
    settings = dict(DEFAULTS)
    for key, default in DEFAULTS.items():
        raw = os.environ.get(key)
        if raw is None or raw == "":
            continue
        settings[key] = _cast(key, raw, default)
    if test_config:
        settings.update(test_config)
    if not settings["DATABASE_URL"] and not needs_database:
        settings["DATABASE_URL"] = NO_DATABASE
    if not settings["DATABASE_URL"]:
        raise ConfigError(
            "DATABASE_URL is not set: point it at PostgreSQL "
            "(postgresql://user@host/db) or, for a demo, sqlite:///instance/idemhook.db"
        )
    settings["DATABASE_URL"] = normalise_database_url(settings["DATABASE_URL"])
    if settings["IDEMHOOK_MIGRATION_DATABASE_URL"]:
        settings["IDEMHOOK_MIGRATION_DATABASE_URL"] = normalise_database_url(
            settings["IDEMHOOK_MIGRATION_DATABASE_URL"], key="IDEMHOOK_MIGRATION_DATABASE_URL"
        )
    listen = settings["IDEMHOOK_WORKER_LISTEN_URL"]
    if listen and listen != "off":
        settings["IDEMHOOK_WORKER_LISTEN_URL"] = normalise_database_url(
            listen, key="IDEMHOOK_WORKER_LISTEN_URL"
        )
    if not settings["IDEMHOOK_HANDLER_TIMEOUT_MS"]:
        settings["IDEMHOOK_HANDLER_TIMEOUT_MS"] = 2 * int(settings["IDEMHOOK_STATEMENT_TIMEOUT_MS"])
    mode = settings["IDEMHOOK_POOL_MODE"]
    if mode not in POOL_MODES:
        raise ConfigError(
            f"IDEMHOOK_POOL_MODE must be {' or '.join(POOL_MODES)}, got {mode!r} "
            "(docs/operations.md, 'Behind a connection pooler')"
        )
    if settings["IDEMHOOK_PREPARED_STATEMENTS"] and mode == "session-pooler":
        raise ConfigError(
            "IDEMHOOK_PREPARED_STATEMENTS=true needs kept connections, but "
            "IDEMHOOK_POOL_MODE=session-pooler keeps none: a statement prepared on a "
            "connection would be prepared again for every delivery. Turn one of them off "
            "(docs/configuration.md)."
        )
    if settings["IDEMHOOK_PUBLIC_URL"]:
        problem = check_public_url(settings["IDEMHOOK_PUBLIC_URL"])
        if problem:
            raise ConfigError(f"IDEMHOOK_PUBLIC_URL: {problem}")
        settings["IDEMHOOK_PUBLIC_URL"] = settings["IDEMHOOK_PUBLIC_URL"].rstrip("/")
    return settings


def _cast(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{key} must be true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, got {raw!r}") from None
        # A default of 0 means "off" is valid (IDEMHOOK_TRUSTED_PROXIES); others must be >= 1.
        if value < 0 or (value == 0 and default != 0):
            raise ConfigError(f"{key} must be positive, got {value}")
        return value
    return raw


def normalise_database_url(url: str | URL, *, key: str = "DATABASE_URL") -> URL:
    """Map ``postgres://`` and bare ``postgresql://`` to the psycopg2 driver we ship.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, and has never
    accepted Heroku's ``postgres://``. Any other PostgreSQL driver is refused
    here, at start-up: the claim speaks psycopg2's protocol (several statements
    in one round trip), which psycopg 3 and the others refuse on every delivery.
    """
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{key} is not a database URL: {_redact(str(url))}") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise ConfigError(
            f"{key} names {backend!r}; idemhook supports PostgreSQL (production) and SQLite (demo)"
        )
    if backend == "postgresql" and parsed.get_driver_name() != "psycopg2":
        raise ConfigError(
            f"{key} names the driver {parsed.get_driver_name()!r} "
            f"({parsed.drivername}://); idemhook runs on psycopg2, which it installs: "
            "write postgresql:// or postgresql+psycopg2:// instead"
        )
    return parsed


def _redact(url: str) -> str:
    # Never echo a password back into a log or terminal.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def check_public_url(value: Any) -> str | None:
    """Say what is wrong with a public base URL (``https://host[/prefix]``), or None."""
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        return f"expected a base URL like 'https://hooks.example.com', got {value!r}"
    if "?" in value or "#" in value or "/webhooks/" in value + "/":
        return (
            f"{value!r} must be the base URL only (scheme, host, optional path prefix); "
            "idemhook appends /webhooks/<source>"
        )
    return None
