"""Strict JSON parsing of a verified raw body: the default ``Scheme.parse``.

Strict means: UTF-8 only, no NaN/Infinity or out-of-range numbers, bounded
nesting. Everything refused here would otherwise fail later, when storing the
payload, as a 500 that makes the provider retry forever.
"""

from __future__ import annotations

import json
import math
from typing import Any

from idemhook._values.errors import BadRequest

#: Deepest accepted JSON nesting. Python's parser gives up near 1000 levels, but a
#: document just under that still breaks serialising it for storage (a 500, retried
#: forever); providers nest a handful of levels.
MAX_NESTING = 256


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e999 parses to inf, which neither JSON nor PostgreSQL can store.
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json(body: bytes) -> Any:
    """Parse the raw body strictly (UTF-8, no NaN/Infinity, bounded nesting)."""
    if not body:
        raise BadRequest("The body is empty; expected a JSON document.", code="invalid_json")
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("The body is not UTF-8 text.", code="invalid_json") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        value = _TOO_DEEP
    except ValueError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    # Counting brackets is cheap; only a body with enough of them can nest too deeply.
    if value is _TOO_DEEP or (
        body.count(b"[") + body.count(b"{") > MAX_NESTING and _deeper_than(value, MAX_NESTING)
    ):
        raise BadRequest(
            f"The JSON is nested too deeply (at most {MAX_NESTING} levels).", code="invalid_json"
        )
    return value


_TOO_DEEP: Any = object()


def _deeper_than(value: Any, limit: int) -> bool:
    """True if ``value`` nests lists/objects more than ``limit`` levels (without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
