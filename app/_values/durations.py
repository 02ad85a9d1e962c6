"""Durations and points in time as people type them: ``15m``, ``2h``, ``30d``, ISO 8601."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class QueryError(ValueError):
    """A filter, cursor or request the caller must fix; ``code`` is a stable error code."""

    def __init__(self, message: str, code: str = "invalid_parameter") -> None:
        super().__init__(message)
        self.code = code


def parse_duration(text: str) -> timedelta:
    """Parse ``30d``, ``2h``, ``15m``, ``90s`` or ``1w``."""
    match = _DURATION.match(text)
    if not match:
        raise QueryError(f"{text!r} is not a duration: use e.g. 15m, 2h, 30d")
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise QueryError(f"{text!r} is too long a duration") from None


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """Parse a point in time: a duration ago (``2h``) or ISO 8601 (``2026-11-01T00:00Z``).

    A time without a zone is taken as UTC.
    """
    now = now or datetime.now(UTC)
    if _DURATION.match(text):
        try:
            return now - parse_duration(text)
        except OverflowError:
            raise QueryError(f"{text!r} reaches back before year 1") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QueryError(
            f"{text!r} is neither a duration (2h, 30d) nor an ISO 8601 time (2026-11-01T00:00Z)"
        ) from None
    # UTC throughout: SQLite compares timestamps as text, without their zone.
    try:
        return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    except OverflowError:
        raise QueryError(f"{text!r} is out of range") from None
