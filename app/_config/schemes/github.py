"""``github``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from idemhook._config.schemes.base import (
    Delivery,
    Reply,
    Scheme,
    invalid,
    match_index,
    register,
    require_header,
)

HEADER = "X-Hub-Signature-256"


@register("github")
class GitHub(Scheme):
    """GitHub repository, organisation and app webhooks (content type ``application/json``).

    GitHub signs no timestamp, so the delivery GUID is the only replay defence.
    The ``ping`` event sent when a hook is created is answered 200 without
    being stored or handled.
    """

    defaults = {"event_id": "header:X-GitHub-Delivery", "event_type": "header:X-GitHub-Event"}

    def _digests(self, body: bytes, keys: Sequence[bytes] | None = None) -> list[str]:
        return [
            "sha256=" + hmac.new(k, body, hashlib.sha256).hexdigest()
            for k in (self.keys if keys is None else keys)
        ]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        given = require_header(delivery, HEADER).strip().lower()
        index = match_index(self._digests(delivery.body, keys), given)
        if index < 0:
            raise invalid(HEADER, " (the webhook's Secret field in GitHub)")
        return index

    def sign(self, delivery: Delivery) -> dict[str, str]:
        return {HEADER: self._digests(delivery.body)[0]}

    def preempt(self, delivery: Delivery) -> Reply | None:
        if delivery.headers.get("X-GitHub-Event") == "ping":
            return Reply(200, {"status": "pong", "source": self.source})
        return None
