"""The admin token: what the read API, the dashboard and a private ``/metrics`` require."""

from __future__ import annotations

import hashlib
import hmac

from flask import current_app, request

from idemhook._values.errors import NotFound, Unauthorized


def token_matches(given: str) -> bool:
    """Whether ``given`` is the configured admin token (False when none is configured)."""
    token = current_app.config.get("IDEMHOOK_ADMIN_TOKEN")
    if not token:
        return False
    # Compare digests so neither the content nor the length of the token leaks in timing.
    expected = hashlib.sha256(str(token).encode()).digest()
    offered = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(offered, expected)


def require_admin_token() -> None:
    """Raise 404 when no admin token is configured, 401 unless the request carries it."""
    if not current_app.config.get("IDEMHOOK_ADMIN_TOKEN"):
        raise NotFound(
            "Not found. (The read API is off until IDEMHOOK_ADMIN_TOKEN is set.)",
            code="not_found",
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not (scheme.lower() == "bearer" and token_matches(given)):
        error = Unauthorized(
            "Send the admin token as 'Authorization: Bearer <IDEMHOOK_ADMIN_TOKEN>'.",
            code="unauthorized",
        )
        error.headers["WWW-Authenticate"] = 'Bearer realm="idemhook"'
        raise error
