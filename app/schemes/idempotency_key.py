"""``idempotency-key``: first-party callers that name each request with ``Idempotency-Key``.

Authenticated either by HMAC (``auth = "hmac"``, the default):
``<signature_header>: sha256=<hex HMAC-SHA256(secret, key + "." + raw body)>``,
which binds the key to the body so a replayed body cannot be re-keyed; or by a
bearer token (``auth = "bearer"``): ``Authorization: Bearer <secret>``.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, Unauthorized
from .base import Delivery, Scheme, invalid, matches_any, register, require_header

KEY_HEADER = "Idempotency-Key"


@register("idempotency-key")
class IdempotencyKey(Scheme):
    """Stripe-style idempotency keys from your own services."""

    option_keys = frozenset({"auth", "signature_header"})
    defaults = {"event_id": f"header:{KEY_HEADER}"}

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        self.auth = config.get("auth", "hmac")
        if self.auth not in ("hmac", "bearer"):
            raise ConfigError(f"[sources.{source}] auth: 'hmac' or 'bearer'")
        header = config.get("signature_header", "X-Signature")
        if not isinstance(header, str) or not header:
            raise ConfigError(f"[sources.{source}] signature_header: must be a header name")
        self.header = header

    def _digests(self, key: str, body: bytes) -> list[str]:
        signed = key.encode() + b"." + body
        return ["sha256=" + hmac.new(k, signed, hashlib.sha256).hexdigest() for k in self.keys]

    def verify(self, delivery: Delivery) -> None:
        if self.auth == "bearer":
            given = delivery.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not token:
                error = Unauthorized(
                    "Send Authorization: Bearer <token> with this source's secret.",
                    code="missing_credentials",
                )
                error.headers["WWW-Authenticate"] = 'Bearer realm="idemhook"'
                raise error
            if not matches_any(self.secrets, token.strip()):
                error = Unauthorized(
                    "The bearer token does not match this source's secret.",
                    code="invalid_credentials",
                )
                error.headers["WWW-Authenticate"] = 'Bearer realm="idemhook"'
                raise error
            return
        given = require_header(delivery, self.header).strip().lower()
        # A missing key fails here as a bad signature; the 400 missing_event_id comes
        # only for authentic requests (bearer auth), never to an unauthenticated caller.
        key = delivery.headers.get(KEY_HEADER, "")
        if not given.startswith("sha256="):
            given = "sha256=" + given
        if not matches_any(self._digests(key, delivery.body), given):
            raise invalid(self.header, f" over the {KEY_HEADER} header, '.', and the raw body")

    def sign(self, delivery: Delivery) -> dict[str, str]:
        key = delivery.headers.get(KEY_HEADER) or str(uuid.uuid4())
        headers = {KEY_HEADER: key}
        if self.auth == "bearer":
            headers["Authorization"] = f"Bearer {self.secrets[0]}"
        else:
            headers[self.header] = self._digests(key, delivery.body)[0]
        return headers
