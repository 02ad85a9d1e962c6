"""``hubspot``: HubSpot webhooks, signature v3 (default), v2 or v1 (``signature_version``).

- v3: ``X-HubSpot-Signature-v3`` = base64 HMAC-SHA256(client secret,
  method + URI + raw body + ``X-HubSpot-Request-Timestamp``), the timestamp in
  milliseconds and checked for freshness. The URI is the full URL HubSpot
  called, query string included: behind a proxy set ``IDEMHOOK_PUBLIC_URL``
  (or the source's ``public_url``).
- v2: ``X-HubSpot-Signature`` = hex SHA-256(secret + method + URI + body).
- v1: ``X-HubSpot-Signature`` = hex SHA-256(secret + body). No timestamp is
  signed in v1/v2, so there is no freshness check.

Bodies are JSON arrays of up to 100 events. HubSpot's ``eventId`` is not
guaranteed unique, so the default dedupe key is the composite
``portalId:subscriptionId:eventId:occurredAt`` (see :class:`idemhook._config.locators.Composite`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote

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

V3_HEADER = "X-HubSpot-Signature-v3"
TIMESTAMP = "X-HubSpot-Request-Timestamp"
LEGACY_HEADER = "X-HubSpot-Signature"
# HubSpot's v3 instructions decode these escapes in the URI before signing.
_DECODED = ("%3A", "%2F", "%3F", "%40", "%21", "%24", "%27", "%28", "%29", "%2A", "%2C", "%3B")


def signed_uri(url: str) -> str:
    """The URI as HubSpot signs it (v3): the listed percent-escapes decoded."""
    for escape in _DECODED:
        url = url.replace(escape, unquote(escape)).replace(escape.lower(), unquote(escape))
    return url


@register("hubspot")
class HubSpot(Scheme):
    """HubSpot app webhooks; the secret is the app's client secret."""

    option_keys = frozenset({"tolerance_seconds", "signature_version"})
    signs_url = True
    defaults = {
        "event_id": ["body:portalId", "body:subscriptionId", "body:eventId", "body:occurredAt"],
        "event_type": "body:subscriptionType",
        "batch": "array",
        "max_batch": 100,
    }

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        self.version = config.get("signature_version", "v3")
        if self.version not in ("v1", "v2", "v3"):
            raise ConfigError(f"[sources.{source}] signature_version: one of v1, v2, v3")
        self.tolerance = positive_int_option(
            source, config, "tolerance_seconds", DEFAULT_TOLERANCE_SECONDS
        )

    def expected(
        self, delivery: Delivery, timestamp: str = "", keys: Sequence[bytes] | None = None
    ) -> list[str]:
        """The signature each configured secret gives for ``delivery`` (v3: at ``timestamp``)."""
        keys = self.keys if keys is None else keys
        body = delivery.body
        method = delivery.method.upper().encode()
        if self.version == "v3":
            signed = method + signed_uri(delivery.url).encode() + body + timestamp.encode()
            return [
                base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
                for key in keys
            ]
        if self.version == "v2":
            return [
                hashlib.sha256(key + method + delivery.url.encode() + body).hexdigest()
                for key in keys
            ]
        return [hashlib.sha256(key + body).hexdigest() for key in keys]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        if self.version == "v3":
            given = require_header(delivery, V3_HEADER).strip()
            timestamp = require_header(delivery, TIMESTAMP).strip()
            index = match_index(self.expected(delivery, timestamp, keys), given)
            if index < 0:
                raise invalid(
                    V3_HEADER,
                    " (the app's client secret) and that the public URL is the one "
                    "registered in HubSpot (IDEMHOOK_PUBLIC_URL); the URL verified was "
                    f"{signed_uri(delivery.url)}",
                )
            check_freshness(timestamp, tolerance=self.tolerance, header=TIMESTAMP, unit=1000)
            return index
        given = require_header(delivery, LEGACY_HEADER).strip().lower()
        index = match_index(self.expected(delivery, "", keys), given)
        if index < 0:
            if self.version == "v2":  # v2 signs the URL too: name the one verified
                raise invalid(
                    LEGACY_HEADER,
                    " and that the public URL is the one registered in HubSpot "
                    f"(IDEMHOOK_PUBLIC_URL); the URL verified was {delivery.url}",
                )
            raise invalid(LEGACY_HEADER)
        return index

    def sign(self, delivery: Delivery) -> dict[str, str]:
        if self.version == "v3":
            timestamp = str(int(time.time() * 1000))
            return {V3_HEADER: self.expected(delivery, timestamp)[0], TIMESTAMP: timestamp}
        return {
            LEGACY_HEADER: self.expected(delivery)[0],
            "X-HubSpot-Signature-Version": self.version,
        }
