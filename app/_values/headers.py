"""What of a request's headers is kept: every header but those that may carry a secret."""

from __future__ import annotations

import functools
from typing import Any

# Header names never stored (in delivery_failures.headers, processed_events.headers or
# rejected_deliveries.headers); a scheme adds the names it is configured with
# (Scheme.secret_headers).
_SECRET_HEADER_PARTS = (
    "signature", "authorization", "cookie", "hmac", "token", "secret", "-sig", "api-key",
    "apikey", "password",
)  # fmt: skip


def safe_headers(headers: Any) -> dict[str, str]:
    """``headers`` without the ones that may carry a secret or a signature.

    A request's headers (Werkzeug's ``EnvironHeaders``) are read straight from
    the WSGI environ, each environ key's header name worked out once: walking
    them through ``EnvironHeaders`` cost more than the claim's own statements.
    """
    environ = getattr(headers, "environ", None)
    if environ is None:
        return {name: value for name, value in headers.items() if _storable(name)}
    stored = {}
    for key, value in environ.items():
        name = _ENVIRON_NAMES.get(key)
        if name is None:
            name = _environ_name(key)
            if len(_ENVIRON_NAMES) < 4096:  # keys come from senders: bound the memory
                _ENVIRON_NAMES[key] = name
        if name:
            stored[name] = value
    return stored


#: WSGI environ key -> the header name stored for it ("" for none: not a header, or secret).
_ENVIRON_NAMES: dict[str, str] = {}


def _environ_name(key: str) -> str:
    if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        name = key.replace("_", "-").title()
    elif key.startswith("HTTP_") and key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
        name = key[5:].replace("_", "-").title()  # as Werkzeug's EnvironHeaders names it
    else:
        return ""
    return name if _storable(name) else ""


@functools.lru_cache(maxsize=4096)
def _storable(name: str) -> bool:
    lowered = name.lower()
    return not any(part in lowered for part in _SECRET_HEADER_PARTS)
