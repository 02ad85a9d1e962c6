"""Where a value sits in a delivery: ``body:<dotted.path>`` or ``header:<Name>``.

Also, for ``event_id`` (and ``order_key`` and ``freshness.object``, which take any
locator ``event_id`` does), ``sha256:body`` (a hash of the event's content, an explicit opt-in) and,
for those and ``event_type``, a list of locators whose values are composed into
one string (see :class:`Composite`).

Locators are parsed once at start-up (a bad spec stops it) and then read each
event's ID, type or batch list without further parsing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from werkzeug.datastructures import Headers

from idemhook._values.errors import ConfigError


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


@dataclass(frozen=True, slots=True)
class AnyHeader:
    """The first of several headers that the request carries (a scheme's default only).

    For senders that use one of two header families for the same thing: Standard
    Webhooks' ``webhook-id`` or Svix's ``svix-id``. Not written in a sources file.
    """

    names: tuple[str, ...]

    def read(self, payload: Any, headers: Headers) -> Any:
        for name in self.names:
            value = headers.get(name)
            if value is not None:
                return value
        return MISSING

    def __str__(self) -> str:
        return " or ".join(f"header:{name}" for name in self.names)


@dataclass(frozen=True, slots=True)
class BodyHash:
    """``sha256:body``: ``sha256:<hex>`` of the event's JSON in canonical form.

    Canonical: keys sorted, no insignificant whitespace, UTF-8. Re-serialising
    the same document gives the same ID; any changed value (a retry counter, a
    timestamp) gives a new one, which is why this is never a default.
    """

    def read(self, payload: Any, headers: Headers) -> Any:
        canonical = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )
        digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
        return "sha256:" + digest

    def __str__(self) -> str:
        return "sha256:body"


@dataclass(frozen=True, slots=True)
class Composite:
    """Several locators read and joined into one string.

    For ``event_id`` the stable format is the parts joined with ``:``, each part
    a string or integer written as text, with ``%`` written ``%25`` and ``:``
    written ``%3A`` so that distinct tuples never compose to the same key:
    HubSpot's ``[portalId, subscriptionId, eventId, occurredAt]`` becomes
    ``62515:1234:987654321:1700000000000``. For ``event_type`` the parts are
    joined with ``.`` unescaped (``deal.create``), so ``deal.*`` patterns work.
    A missing part makes the whole value missing.
    """

    parts: tuple[BodyPath | Header, ...]
    separator: str = ":"
    escape: bool = True

    def read(self, payload: Any, headers: Headers) -> Any:
        texts = []
        for part in self.parts:
            value = part.read(payload, headers)
            if value is MISSING or value is None:
                return MISSING
            if isinstance(value, bool) or not isinstance(value, str | int):
                return value  # the caller reports the wrong type
            text = str(value)
            if self.escape:
                text = text.replace("%", "%25").replace(":", "%3A")
            texts.append(text)
        return self.separator.join(texts)

    def missing(self, payload: Any, headers: Headers) -> str:
        """Say which part is missing, for the error about a missing value."""
        for index, part in enumerate(self.parts, start=1):
            value = part.read(payload, headers)
            if value is MISSING or value is None:
                return f"{part} (part {index} of {self})"
        return str(self)

    def __str__(self) -> str:
        return "[" + ", ".join(str(p) for p in self.parts) + "]"


Locator = BodyPath | Header | AnyHeader | BodyHash | Composite


def parse(spec: Any, *, source: str, key: str) -> Locator:
    """Parse a locator spec, raising :class:`ConfigError` naming the source and key."""
    table, _, name = key.rpartition(".")  # "freshness.object": [sources.<name>.freshness]
    where = f"[sources.{source}{'.' + table if table else ''}] {name}"
    if isinstance(spec, AnyHeader):  # a scheme's default, already built
        return spec
    if isinstance(spec, list | tuple):
        if key not in ("event_id", "event_type", "order_key", "freshness.object") or len(spec) < 2:
            raise ConfigError(
                f"{where}: a list of locators (a composite key) is allowed for event_id, "
                "event_type, order_key and freshness.object only, with at least two entries"
            )
        parts = tuple(_simple(item, where) for item in spec)
        if key != "event_type":
            return Composite(parts)
        return Composite(parts, separator=".", escape=False)
    if spec == "sha256:body":
        if key not in ("event_id", "order_key", "freshness.object"):
            raise ConfigError(f"{where}: 'sha256:body' is allowed for event_id only")
        return BodyHash()
    return _simple(spec, where)


def _simple(spec: Any, where: str) -> BodyPath | Header:
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(
            f"{where}: expected 'body:<dotted.path>' or 'header:<Name>', got {spec!r}"
        )
    kind, _, rest = spec.partition(":")
    if kind == "sha256":
        raise ConfigError(f"{where}: the only hash locator is 'sha256:body', got {spec!r}")
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
