"""``standard-webhooks`` (and ``svix``): ``webhook-id``/``-timestamp``/``-signature``.

The signature header is a space-separated list of ``v1,<base64>`` entries
(several while a secret rotates); other versions (``v1a`` ed25519) are ignored.
Svix sends the same under ``svix-id``/``svix-timestamp``/``svix-signature``;
both families are accepted by both scheme names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Any

from idemhook._config.locators import AnyHeader
from idemhook._config.schemes.base import (
    DEFAULT_TOLERANCE_SECONDS,
    Delivery,
    Scheme,
    check_freshness,
    invalid,
    match_index,
    positive_int_option,
    register,
)
from idemhook._values.errors import ConfigError, Unauthorized

PREFIXES = ("webhook", "svix")


@register("standard-webhooks")
class StandardWebhooks(Scheme):
    """v1 = base64 HMAC-SHA256(key = base64-decode(secret minus ``whsec_``), ``id.ts.body``)."""

    option_keys = frozenset({"tolerance_seconds"})
    #: The header families looked for, in this order (the first with an ``-id`` header wins,
    #: for the signature and for the event ID alike).
    families: tuple[str, ...] = PREFIXES
    defaults = {
        "event_id": AnyHeader(("webhook-id", "svix-id")),
        "event_type": "body:type",
    }
    secret_prefix = "whsec_"

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        self.tolerance = positive_int_option(
            source, config, "tolerance_seconds", DEFAULT_TOLERANCE_SECONDS
        )

    def secret_key(self, secret: str) -> bytes:
        raw = secret.removeprefix(self.secret_prefix)
        try:
            # Unpadded base64 is accepted, as the reference libraries re-pad it.
            return base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"[sources.{self.source}] secret: not a Standard Webhooks secret "
                "(expected whsec_ followed by base64, as the provider shows it)"
            ) from None

    def _headers(self, delivery: Delivery) -> tuple[str, str, str, str]:
        for prefix in self.families:
            msg_id = delivery.headers.get(f"{prefix}-id")
            if msg_id is not None:
                break
        else:
            prefix, msg_id = self.families[0], None
        timestamp = delivery.headers.get(f"{prefix}-timestamp")
        signature = delivery.headers.get(f"{prefix}-signature")
        for name, value in (("id", msg_id), ("timestamp", timestamp), ("signature", signature)):
            if not value:
                raise Unauthorized(
                    f"The {prefix}-{name} header is missing: the sender must sign each request.",
                    code="missing_signature",
                )
        return prefix, msg_id, timestamp, signature  # type: ignore[return-value]

    def _digests(
        self, msg_id: str, timestamp: str, body: bytes, keys: Sequence[bytes] | None = None
    ) -> list[str]:
        signed = f"{msg_id}.{timestamp}.".encode() + body
        return [
            base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            for key in (self.keys if keys is None else keys)
        ]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        prefix, msg_id, timestamp, signature = self._headers(delivery)
        expected = self._digests(msg_id, timestamp, delivery.body, keys)
        found = -1
        for entry in signature.split():
            version, _, value = entry.partition(",")
            if version == "v1":
                index = match_index(expected, value)
                found = index if found < 0 else found
        if found < 0:
            raise invalid(f"{prefix}-signature")
        check_freshness(timestamp, tolerance=self.tolerance, header=f"{prefix}-timestamp")
        return found

    def sign(self, delivery: Delivery) -> dict[str, str]:
        msg_id = delivery.headers.get("webhook-id") or delivery.headers.get("svix-id")
        if not msg_id:
            # Stable for the same body, as providers keep the ID across retries.
            digest = hashlib.sha256(delivery.body).digest()[:15]
            msg_id = "msg_" + base64.b32encode(digest).decode().lower()
        timestamp = str(int(time.time()))
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + self._digests(msg_id, timestamp, delivery.body)[0],
        }


@register("svix")
class Svix(StandardWebhooks):
    """Svix: the Standard Webhooks scheme with the ``svix-*`` header names first."""

    families = ("svix", "webhook")
    defaults = {"event_id": AnyHeader(("svix-id", "webhook-id")), "event_type": "body:type"}

    def sign(self, delivery: Delivery) -> dict[str, str]:
        headers = super().sign(delivery)
        return {name.replace("webhook-", "svix-"): value for name, value in headers.items()}
