"""Freshness: which object an event changes, and which version of it the event carries.

A source with ``[sources.<name>.freshness]`` (docs/configuration.md#freshness) names
two locators::

    [sources.hubspot.freshness]
    object = "body:objectId"       # any locator event_id takes (a list joins parts)
    version = "body:occurredAt"    # an integer, a number, or an RFC 3339 time

Each event's object key and version are read once, at intake, and refused with ``400``
when they are missing (``missing_freshness_field``, naming the locator: a typo in the
config must not silently disable the guard) or do not parse (``invalid_version``,
``invalid_object_key``). The claim then compares the version with the newest applied to
the object (:mod:`idemhook._store.object_versions`).

**Versions are compared as numbers**, larger is newer, stored in a ``numeric`` column
exactly: an integer or a number as it is (``1764300000123``, ``17.5``; a string holding
one, as a header gives it, the same), an RFC 3339 time as seconds since
1970-01-01T00:00:00Z with every fractional digit given (``2026-01-02T03:04:05.678+01:00``
is ``1767319445.678``). One source's versions must be of one kind: an integer count of
milliseconds and a time in seconds would not compare meaningfully.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from idemhook._config import locators
from idemhook._config.locators import MISSING, BodyHash, Composite, Locator
from idemhook._values.errors import BadRequest, ConfigError

#: The keys of a ``[sources.<name>.freshness]`` table.
KEYS = ("object", "version")
#: Longest object key (the column's length), as for event IDs.
MAX_OBJECT_KEY_LENGTH = 255
#: Most significant digits, and largest power of ten, of a version: far beyond any
#: timestamp or counter, small enough that a hostile value costs nothing to compare.
MAX_VERSION_DIGITS = 40
MAX_VERSION_EXPONENT = 60

#: Integers within this bound (MAX_VERSION_DIGITS digits) are compared as they are.
_INT_BOUND = 10**MAX_VERSION_DIGITS
#: RFC 3339, section 5.6: ``date-time``, with its optional space for "T" (section 5.6 note).
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)
#: A number as JSON writes one (a version given as a string, e.g. from a header).
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Freshness:
    """A source's ``freshness`` table, resolved."""

    object: Locator
    version: Locator


class Versioned(NamedTuple):
    """One event's object and version, as read at intake (a tuple: read per event)."""

    object_key: str
    #: An integer as it is (the common case: no Decimal to build), else a Decimal.
    version: int | Decimal


def parse(table: Any, *, source: str) -> Freshness:
    """Validate a ``[sources.<source>.freshness]`` table."""
    where = f"[sources.{source}.freshness]"
    if not isinstance(table, Mapping):
        raise ConfigError(
            f'{where}: a table with object and version, e.g. object = "body:objectId", '
            'version = "body:occurredAt"'
        )
    unknown = set(table) - set(KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(KEYS)})"
        )
    for key in KEYS:
        if key not in table:
            example = '"body:objectId"' if key == "object" else '"body:occurredAt"'
            raise ConfigError(f"{where} {key}: missing; e.g. {key} = {example}")
    # The object takes what event_id takes (a list joins parts), except a hash of the body,
    # which would make every event an object of its own.
    object_ = locators.parse(table["object"], source=source, key="freshness.object")
    if isinstance(object_, BodyHash):
        raise ConfigError(
            f"{where} object: 'sha256:body' names no object (every event would be its own)"
        )
    version = table["version"]
    if isinstance(version, list | tuple) or version == "sha256:body":
        raise ConfigError(
            f"{where} version: one locator, 'body:<dotted.path>' or 'header:<Name>', "
            f"got {version!r}"
        )
    return Freshness(object_, locators.parse(version, source=source, key="freshness.version"))


def read(freshness: Freshness, payload: Any, headers: Any) -> Versioned:
    """The object key and version of one event; ``BadRequest`` (400) if either is wrong."""
    object_key = freshness.object.read(payload, headers)
    # The common cases first, checked as _object_key would (read for every event).
    if type(object_key) is int:
        object_key = str(object_key)
    elif not (
        type(object_key) is str
        and 0 < len(object_key) <= MAX_OBJECT_KEY_LENGTH
        and "\x00" not in object_key
        and object_key.isascii()
    ):
        object_key = _object_key(freshness.object, payload, headers)
    version = freshness.version.read(payload, headers)
    if type(version) is not int or not -_INT_BOUND < version < _INT_BOUND:
        version = normalize(_present(freshness.version, payload, headers), freshness.version)
    return Versioned(object_key, version)


def versions_of(freshness: Freshness, events: Sequence[Any]) -> list[Versioned]:
    """Each event's :class:`Versioned`, read before anything is stored (400 on any problem)."""
    return [read(freshness, e.payload, e.headers) for e in events]


def in_version_order(versions: Sequence[Versioned]) -> list[int]:
    """The positions of a delivery's events in the order to apply them.

    Grouped by object, in the order of their keys (every delivery and every worker takes
    its objects' locks in that order, so none waits for another crosswise) and, within an
    object, by version, oldest first: each is then compared with the one applied before
    it. Events of one object with equal versions keep the delivery's order.
    """
    return sorted(range(len(versions)), key=versions.__getitem__)


def normalize(value: Any, where: Any = "the version") -> int | Decimal:
    """A version as the number it is compared by (see the module docstring).

    Raises ``BadRequest`` ``invalid_version`` for anything else (``where``: its locator).
    """
    if isinstance(value, bool):
        raise _invalid(where, "is true or false, not a number or a time")
    if isinstance(value, int):
        if -_INT_BOUND < value < _INT_BOUND:
            return value
        number = None
    elif isinstance(value, float):
        number = Decimal(repr(value))  # the shortest text that reads back as this float
    elif isinstance(value, str):
        number = _from_text(value, where)
    else:
        raise _invalid(where, f"is a {_json_type(value)}, not a number or a time")
    if number is None or not number.is_finite() or _too_large(number):
        raise _invalid(
            where,
            f"is out of range (at most {MAX_VERSION_DIGITS} digits, magnitude below "
            f"1e{MAX_VERSION_EXPONENT})",
        )
    return number


def _from_text(text: str, where: Any) -> Decimal | None:
    if len(text) > 80:
        return None
    if _NUMBER.fullmatch(text):
        try:
            return Decimal(text)
        except InvalidOperation:  # pragma: no cover (the pattern is Decimal's syntax)
            return None
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _invalid(
            where,
            "is neither a number nor an RFC 3339 time (e.g. 2026-01-02T03:04:05Z: a date, "
            "a time and its offset from UTC)",
        )
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8)
    try:
        # Seconds may be 60 (a leap second): counted from the minute, as RFC 3339 allows.
        start = datetime(year, month, day, hour, minute, tzinfo=UTC)
    except ValueError:
        start = None
    if start is None or second > 60:
        raise _invalid(where, "is not a valid date and time")
    shift = 0
    if offset not in ("Z", "z"):
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise _invalid(where, "has an invalid offset from UTC")
        shift = (hours * 60 + minutes) * 60 * (1 if offset[0] == "+" else -1)
    whole = int((start - _EPOCH).total_seconds()) + second - shift
    return Decimal(whole) + (Decimal(fraction) if fraction else Decimal(0))


def _too_large(number: Decimal) -> bool:
    digits = len(number.as_tuple().digits)
    return digits > MAX_VERSION_DIGITS or abs(number.adjusted()) >= MAX_VERSION_EXPONENT


def _object_key(locator: Locator, payload: Any, headers: Any) -> str:
    value = _present(locator, payload, headers)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(
            f"The object key at {locator} must be a string or an integer, not {_json_type(value)}.",
            code="invalid_object_key",
        )
    problem = None
    if value == "":
        problem = "is empty"
    elif len(value) > MAX_OBJECT_KEY_LENGTH:
        problem = f"is {len(value)} characters long (at most {MAX_OBJECT_KEY_LENGTH})"
    elif "\x00" in value:
        problem = "contains a NUL character"
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid Unicode (a lone surrogate)"
    if problem:
        raise BadRequest(f"The object key at {locator} {problem}.", code="invalid_object_key")
    return value


def _present(locator: Locator, payload: Any, headers: Any) -> Any:
    value = locator.read(payload, headers)
    if value is MISSING or value is None:
        where = locator.missing(payload, headers) if isinstance(locator, Composite) else locator
        raise BadRequest(
            f"A freshness field is missing: expected it at {where} "
            "([sources.<name>.freshness]); the event was not recorded.",
            code="missing_freshness_field",
            locator=str(where),
        )
    return value


def _invalid(where: Any, problem: str) -> BadRequest:
    return BadRequest(f"The version at {where} {problem}.", code="invalid_version")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
