"""``attio``: ``Attio-Signature: <hex HMAC-SHA256(secret, raw body)>``."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Sequence

from idemhook._config.schemes.base import (
    Delivery,
    Scheme,
    invalid,
    match_index,
    register,
    require_header,
)

HEADER = "Attio-Signature"
LEGACY_HEADER = "X-Attio-Signature"


@register("attio")
class Attio(Scheme):
    """Attio webhooks: ``{webhook_id, events: [...]}``; the ID is the ``Idempotency-Key`` header.

    The key identifies the whole request (the same on every retry), not each
    event, so an envelope may hold one event only (``max_batch = 1``, which is
    what Attio sends today): a second event would otherwise be taken for a
    duplicate of the first and silently dropped. A request with more is refused
    (400 ``batch_too_large``) so the failure is loud.
    """

    defaults = {
        "event_id": "header:Idempotency-Key",
        "event_type": "body:event_type",
        "batch": "body:events",
        "max_batch": 1,
    }

    def _digests(self, body: bytes, keys: Sequence[bytes] | None = None) -> list[str]:
        return [
            hmac.new(k, body, hashlib.sha256).hexdigest()
            for k in (self.keys if keys is None else keys)
        ]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        header = HEADER if delivery.headers.get(HEADER) else LEGACY_HEADER
        given = require_header(delivery, header).strip().lower()
        index = match_index(self._digests(delivery.body, keys), given)
        if index < 0:
            raise invalid(header, " (the webhook's secret in Attio's developer settings)")
        return index

    def sign(self, delivery: Delivery) -> dict[str, str]:
        headers = {HEADER: self._digests(delivery.body)[0]}
        if not delivery.headers.get("Idempotency-Key"):
            # Stable for the same body, as Attio keeps the key across retries.
            digest = hashlib.sha256(delivery.body).digest()
            headers["Idempotency-Key"] = str(uuid.UUID(bytes=digest[:16]))
        return headers
