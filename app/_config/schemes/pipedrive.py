"""``pipedrive``: HTTP Basic credentials set on the webhook (Pipedrive signs nothing)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from idemhook._config.schemes.base import Delivery, Scheme, match_index, register
from idemhook._values.errors import ConfigError, Unauthorized


def basic_header(username: str, password: str) -> str:
    """The ``Authorization`` value for HTTP Basic credentials."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


@register("pipedrive")
class Pipedrive(Scheme):
    """Webhooks v2: ``Authorization: Basic`` with ``username`` and the secret as password.

    ``http_auth_user``/``http_auth_password`` on Pipedrive's side; several
    passwords may be configured while one is changed. The ID is ``meta.id``,
    the type ``<meta.entity>.<meta.action>`` (``deal.change``).
    """

    option_keys = frozenset({"username"})
    defaults = {
        "event_id": "body:meta.id",
        "event_type": ["body:meta.entity", "body:meta.action"],
    }

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        username = config.get("username")
        if not isinstance(username, str) or not username.strip() or ":" in username:
            raise ConfigError(
                f"[sources.{source}] username: required, the HTTP auth user set on the "
                "Pipedrive webhook (no ':')"
            )
        self.username = username
        self._expected = tuple(basic_header(username, secret) for secret in self.secrets)

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        given = delivery.headers.get("Authorization")
        if not given:
            error = Unauthorized(
                "The Authorization header is missing: set the HTTP auth user and password on "
                "the Pipedrive webhook.",
                code="missing_credentials",
            )
            error.headers["WWW-Authenticate"] = 'Basic realm="idemhook"'
            raise error
        expected = (
            self._expected
            if keys is None
            else [basic_header(self.username, key.decode()) for key in keys]
        )
        index = match_index(expected, given.strip())
        if index < 0:
            error = Unauthorized(
                "The HTTP Basic credentials do not match this source's username and secret.",
                code="invalid_credentials",
            )
            error.headers["WWW-Authenticate"] = 'Basic realm="idemhook"'
            raise error
        return index

    def keys_changed(self) -> None:
        self._expected = tuple(basic_header(self.username, key.decode()) for key in self.keys)

    def sign(self, delivery: Delivery) -> dict[str, str]:
        return {"Authorization": self._expected[0]}
