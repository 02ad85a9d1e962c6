"""JSON text as idemhook stores it: what PostgreSQL's JSONB refuses is wrapped, not lost."""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

#: Key of the wrapper that holds a payload PostgreSQL's JSONB cannot store.
RAW_JSON_KEY = "$idemhook_raw_json"


def dumps(value: Any, *, strict: bool = False) -> str:
    """Serialise JSON for storage, wrapping what JSONB would refuse instead of failing.

    JSONB rejects ``\\u0000`` and lone UTF-16 surrogates. Such a value is stored
    as ``{"$idemhook_raw_json": "<its exact JSON text>"}`` so that nothing is lost
    and the provider is not made to retry forever (see docs/querying.md).
    ``strict``: NaN and infinities raise ``ValueError`` (they are not JSON, and
    JSONB refuses them): a handler result that holds one fails its event.
    """
    text = (_STRICT if strict else _LENIENT).encode(value)
    if "\\u0000" in text:
        return _wrap(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _wrap(value)
    return text


# Built once: ``json.dumps`` with options builds a new encoder on every call.
_LENIENT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def string(value: str | None) -> str:
    """``value`` as a JSON string, or ``null``: for IDs, types and keys, which intake checks
    (no NUL, no lone surrogate), written into a statement's one JSON parameter."""
    return "null" if value is None else encode_basestring(value)


def _wrap(value: Any) -> str:
    return json.dumps({RAW_JSON_KEY: json.dumps(value, separators=(",", ":"))})


def loads(text: str) -> Any:
    value = json.loads(text)
    if isinstance(value, dict) and len(value) == 1 and RAW_JSON_KEY in value:
        return json.loads(value[RAW_JSON_KEY])
    return value
