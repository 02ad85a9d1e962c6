"""JSON text as idemhook stores it: what PostgreSQL's JSONB refuses is wrapped, not lost."""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
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
    text = _STRICT.encode(value) if strict else _lenient(value)
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


def _lenient(value: Any) -> str:
    """``_LENIENT.encode(value)``, on one C encoder made once.

    ``JSONEncoder.encode`` makes a C encoder on every call, with a fresh dictionary of the
    containers it is inside (to refuse a circular value): about a fifth of encoding a
    webhook's payload (docs/performance.md). The encoder made here keeps no such dictionary,
    so it can serve every thread at once; a circular value (never one parsed from JSON)
    exhausts the recursion limit instead, and is then encoded the usual way, which refuses
    it with ``ValueError`` as before.
    """
    if _C_LENIENT is None:
        return _LENIENT.encode(value)
    try:
        return "".join(_C_LENIENT(value, 0))
    except RecursionError:
        return _LENIENT.encode(value)


#: ``JSONEncoder.iterencode``'s C encoder for ``_LENIENT``'s options, without the
#: containers' dictionary (markers None): key and item separators, no sort, no skip, NaN
#: allowed.
_C_LENIENT = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None, _LENIENT.default, encode_basestring, None, ":", ",", False, False, True
    )
)


def body_text(body: bytes) -> str | None:
    """A JSON body's own text, to store as the payload it was parsed into; None: store
    ``dumps`` of the parsed value instead.

    The body passed the strict parse (:func:`idemhook._config.parsing.parse_json`): UTF-8,
    no NaN, no out-of-range number, so JSONB holds the same document whether it is given
    this text or the parsed value serialised again, numbers as the sender wrote them
    (``1.50`` stays ``1.50``). Serialising again cost more than the rest of the claim's
    parameters together (docs/performance.md). A body with a ``\\u`` escape goes
    through :func:`dumps`, which wraps what JSONB refuses (``\\u0000``, a lone surrogate).
    """
    text = body.decode("utf-8-sig")  # as parse_json decoded it: a byte-order mark dropped
    return None if "\\u" in text else text


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
