"""``shopify``: ``X-Shopify-Hmac-Sha256: base64(HMAC-SHA256(secret, raw body))``."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from idemhook._config.schemes.base import (
    Delivery,
    Scheme,
    invalid,
    match_index,
    register,
    require_header,
)

HEADER = "X-Shopify-Hmac-Sha256"


@register("shopify")
class Shopify(Scheme):
    """Shopify webhooks; ID ``X-Shopify-Webhook-Id`` (kept across retries), type the topic."""

    defaults = {
        "event_id": "header:X-Shopify-Webhook-Id",
        "event_type": "header:X-Shopify-Topic",
    }
    # The app's client secret; a store's own webhook key is hexadecimal, without a prefix.
    secret_prefix = "shpss_"

    def _digests(self, body: bytes, keys: Sequence[bytes] | None = None) -> list[str]:
        return [
            base64.b64encode(hmac.new(k, body, hashlib.sha256).digest()).decode()
            for k in (self.keys if keys is None else keys)
        ]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        given = require_header(delivery, HEADER).strip()
        index = match_index(self._digests(delivery.body, keys), given)
        if index < 0:
            raise invalid(HEADER, " (the app's client secret, or the store's webhook secret)")
        return index

    def sign(self, delivery: Delivery) -> dict[str, str]:
        return {HEADER: self._digests(delivery.body)[0]}
