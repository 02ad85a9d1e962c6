"""``hmac-sha256``: hex HMAC-SHA256 of the raw body in one header (generic senders)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from idemhook._config.schemes.base import (
    Delivery,
    Scheme,
    match_index,
    register,
    require_header,
)
from idemhook._values.errors import ConfigError, Unauthorized


@register("hmac-sha256")
class HmacSha256(Scheme):
    """``<signature_header>: [sha256=]<hex HMAC-SHA256(secret, raw body)>``."""

    option_keys = frozenset({"signature_header"})

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        header = config.get("signature_header", "X-Signature")
        if not isinstance(header, str) or not header:
            raise ConfigError(f"[sources.{source}] signature_header: must be a header name")
        self.header = header

    @property
    def secret_headers(self) -> tuple[str, ...]:
        return (self.header,)

    def _digests(self, body: bytes, keys: Sequence[bytes] | None = None) -> list[str]:
        return [
            hmac.new(key, body, hashlib.sha256).hexdigest()
            for key in (self.keys if keys is None else keys)
        ]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        given = require_header(delivery, self.header).strip()
        if given[:7].lower() == "sha256=":
            given = given[7:]
        index = match_index(self._digests(delivery.body, keys), given.lower())
        if index < 0:
            raise Unauthorized(
                f"The {self.header} signature does not match the body: check that the "
                "sender signs the raw body with this source's secret.",
                code="invalid_signature",
            )
        return index

    def sign(self, delivery: Delivery) -> dict[str, str]:
        return {self.header: "sha256=" + self._digests(delivery.body)[0]}
