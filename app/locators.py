"""Where a value sits in a delivery: ``body:<dotted.path>`` or ``header:<Name>``.

Locators are parsed once at start-up (a bad spec stops it) and then read each
event's ID, type or batch list without further parsing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from werkzeug.datastructures import Headers

from .errors import ConfigError


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class BodyPath:
    """A value inside the event's JSON: ``body:data.object.id``; ``body:`` alone is the root."""

    parts: tuple[str | int, ...]

    def read(self, payload: Any, headers: Headers) -> Any:
        value = payload
        for part in self.parts:
            if isinstance(part, int) and isinstance(value, list):
                if not -len(value) <= part < len(value):
                    return MISSING
                value = value[part]
            elif isinstance(value, Mapping):
                value = value.get(str(part), MISSING)
                if value is MISSING:
                    return MISSING
            else:
                return MISSING
        return value

    def __str__(self) -> str:
        return "body:" + ".".join(str(p) for p in self.parts)


@dataclass(frozen=True, slots=True)
class Header:
    """A request header: ``header:X-GitHub-Delivery`` (case-insensitive)."""

    name: str

    def read(self, payload: Any, headers: Headers) -> Any:
        value = headers.get(self.name)
        return MISSING if value is None else value

    def __str__(self) -> str:
        return "header:" + self.name


Locator = BodyPath | Header


def parse(spec: Any, *, source: str, key: str) -> Locator:
    """Parse a locator spec, raising :class:`ConfigError` naming the source and key."""
    where = f"[sources.{source}] {key}"
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(
            f"{where}: expected 'body:<dotted.path>' or 'header:<Name>', got {spec!r}"
        )
    kind, _, rest = spec.partition(":")
    if kind == "header":
        if not rest or any(c in rest for c in " :\t\r\n"):
            raise ConfigError(f"{where}: {spec!r} does not name a header")
        return Header(rest)
    if kind == "body":
        if rest == "":
            return BodyPath(())
        segments = rest.split(".")
        if any(s == "" for s in segments):
            raise ConfigError(f"{where}: {spec!r} has an empty path segment")
        return BodyPath(tuple(int(s) if s.lstrip("-").isdigit() else s for s in segments))
    raise ConfigError(f"{where}: unknown locator kind {kind!r} in {spec!r}; use body: or header:")
