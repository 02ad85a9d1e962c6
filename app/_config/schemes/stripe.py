"""``stripe``: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]``, timestamp-bound HMAC-SHA256."""

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

    def _digests(
        self, timestamp: str, body: bytes, keys: Sequence[bytes] | None = None
    ) -> list[str]:
        signed = timestamp.encode() + b"." + body
        return [
            hmac.new(key, signed, hashlib.sha256).hexdigest()
            for key in (self.keys if keys is None else keys)
        ]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
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
        expected = self._digests(timestamp, delivery.body, keys)
        found = -1
        for candidate in given:
            index = match_index(expected, candidate)
            found = index if found < 0 else found
        if found < 0:
            raise invalid(HEADER)
        check_freshness(timestamp, tolerance=self.tolerance, header=f"{HEADER} t=")
        return found

    def sign(self, delivery: Delivery) -> dict[str, str]:
        timestamp = str(int(time.time()))
        return {HEADER: f"t={timestamp},v1={self._digests(timestamp, delivery.body)[0]}"}
