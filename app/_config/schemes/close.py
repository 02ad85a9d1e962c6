"""``close``: ``close-sig-hash`` = hex HMAC-SHA256(hex-decoded key, timestamp + raw body)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Any

from idemhook._config.schemes.base import (
    DEFAULT_TOLERANCE_SECONDS,
    Delivery,
    Scheme,
    check_freshness,
    invalid,
    match_index,
    positive_int_option,
    register,
    require_header,
)
from idemhook._values.errors import ConfigError

HASH = "close-sig-hash"
TIMESTAMP = "close-sig-timestamp"


@register("close")
class Close(Scheme):
    """Close CRM webhooks; the secret is the subscription's hex ``signature_key``."""

    option_keys = frozenset({"tolerance_seconds"})
    defaults = {
        "event_id": "body:event.id",
        "event_type": ["body:event.object_type", "body:event.action"],
    }

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        self.tolerance = positive_int_option(
            source, config, "tolerance_seconds", DEFAULT_TOLERANCE_SECONDS
        )

    def secret_key(self, secret: str) -> bytes:
        try:
            return bytes.fromhex(secret)
        except ValueError:
            raise ConfigError(
                f"[sources.{self.source}] secret: Close's signature_key is hexadecimal; "
                "copy it exactly as the subscription returned it"
            ) from None

    def _digests(
        self, timestamp: str, body: bytes, keys: Sequence[bytes] | None = None
    ) -> list[str]:
        signed = timestamp.encode() + body
        return [
            hmac.new(k, signed, hashlib.sha256).hexdigest()
            for k in (self.keys if keys is None else keys)
        ]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        given = require_header(delivery, HASH).strip().lower()
        timestamp = require_header(delivery, TIMESTAMP).strip()
        index = match_index(self._digests(timestamp, delivery.body, keys), given)
        if index < 0:
            raise invalid(HASH)
        check_freshness(timestamp, tolerance=self.tolerance, header=TIMESTAMP)
        return index

    def sign(self, delivery: Delivery) -> dict[str, str]:
        timestamp = str(int(time.time()))
        return {TIMESTAMP: timestamp, HASH: self._digests(timestamp, delivery.body)[0]}
