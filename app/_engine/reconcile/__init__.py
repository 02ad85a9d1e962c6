"""Reconcile: find the events a provider never got through in its own log, and apply them.

:func:`configured` resolves, at start-up, which sources are reconciled and how
(``[sources.<name>.reconcile]``, or a plugin's ``@reconciler``), and refuses what would
not work: :mod:`.config` (the settings), :mod:`.run` (one run), :mod:`.stripe`,
:mod:`.github` and :mod:`.plugin` (the reconcilers), :mod:`.http` (the providers' limits).
docs/reconcile.md is the user's guide.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from idemhook._config.reconcile import (
    PLUGIN,
    ReconcileConfig,
    check_retention,
    duration,
    provider_of,
)
from idemhook._engine.registry import Registry
from idemhook._values.errors import ConfigError

__all__ = ["ReconcileConfig", "configured", "retention_of"]


def retention_of(value: Any) -> timedelta | None:
    """``IDEMHOOK_RETENTION``: how long claims are kept; None when it is not set."""
    if value in (None, ""):
        return None
    return duration(str(value), None, "IDEMHOOK_RETENTION")


def configured(
    sources: Mapping[str, Any], registry: Registry, retention: timedelta | None
) -> dict[str, ReconcileConfig]:
    """Each reconciled source's settings, checked (see docs/reconcile.md)."""
    found: dict[str, ReconcileConfig] = {}
    for name, source in sources.items():
        config = source.reconcile
        plugin = registry.reconcilers.get(name)
        scheme = source.scheme.name
        if plugin is not None and provider_of(scheme) != PLUGIN:
            raise ConfigError(
                f"reconciler {plugin.name} is registered for source {name!r}, whose scheme "
                f"{scheme!r} has a built-in reconciler: remove the @reconciler, or configure "
                f"[sources.{name}.reconcile] for the built-in one"
            )
        if config is None:
            if plugin is not None:
                found[name] = ReconcileConfig(name, PLUGIN)
            continue
        if config.provider == PLUGIN and plugin is None:
            raise ConfigError(
                f"[sources.{name}.reconcile]: scheme {scheme!r} has no built-in reconciler "
                f"(Stripe and GitHub have) and no plugin registers @reconciler({name!r}) "
                "(docs/reconcile.md#your-own-reconciler)"
            )
        found[name] = config
    check_retention(found, retention)
    return found
