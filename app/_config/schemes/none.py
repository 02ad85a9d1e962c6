"""``none``: no verification at all; refused unless the source sets ``allow_unverified``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from idemhook._config.schemes.base import Delivery, Scheme, register
from idemhook._values.errors import ConfigError


@register("none")
class Unverified(Scheme):
    """Accept every request. Only for trusted networks and local experiments."""

    needs_secret = False
    serves_tenants = False

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        if config.get("allow_unverified") is not True:
            raise ConfigError(
                f"[sources.{source}] scheme: 'none' accepts unsigned requests from anyone; "
                "set allow_unverified = true to confirm that is intended"
            )

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        return 0

    def sign(self, delivery: Delivery) -> dict[str, str]:
        return {}
