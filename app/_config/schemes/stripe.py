"""``stripe``: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]``, timestamp-bound HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

from idemhook._config.schemes.base import (
    DEFAULT_TOLERANCE_SECONDS,
    Delivery,
    Scheme,
    check_freshness,
    invalid,
    matches_any,
    positive_int_option,
    register,
    require_header,
)

HEADER = "Stripe-Signature"


@register("stripe")
class Stripe(Scheme):
    """v1 = hex HMAC-SHA256(key = the whole ``whsec_...`` string, ``t + "." + body``).

    Any one matching ``v1`` passes (Stripe lists several while a secret rolls);
    ``v0`` and unknown schemes are ignored.
    """

    option_keys = frozenset({"tolerance_seconds"})
    defaults = {"event_id": "body:id", "event_type": "body:type"}
    secret_prefix = "whsec_"

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        self.tolerance = positive_int_option(
            source, config, "tolerance_seconds", DEFAULT_TOLERANCE_SECONDS
        )

    def _digests(self, timestamp: str, body: bytes) -> list[str]:
        signed = timestamp.encode() + b"." + body
        return [hmac.new(key, signed, hashlib.sha256).hexdigest() for key in self.keys]

    def verify(self, delivery: Delivery) -> None:
        header = require_header(delivery, HEADER)
        timestamp = None
        given: list[str] = []
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            if name == "t":
                timestamp = value
            elif name == "v1":
                given.append(value.lower())
        if timestamp is None or not given:
            raise invalid(HEADER, " (the header has no t= or no v1= entry)")
        expected = self._digests(timestamp, delivery.body)
        found = False
        for candidate in given:
            found |= matches_any(expected, candidate)
        if not found:
            raise invalid(HEADER)
        check_freshness(timestamp, tolerance=self.tolerance, header=f"{HEADER} t=")

    def sign(self, delivery: Delivery) -> dict[str, str]:
        timestamp = str(int(time.time()))
        return {HEADER: f"t={timestamp},v1={self._digests(timestamp, delivery.body)[0]}"}
