"""What a verification scheme is, and the registry that one module per scheme plugs into.

A scheme knows how one kind of sender signs its requests. It verifies an
incoming :class:`Delivery` (raising :class:`~idemhook._values.errors.Unauthorized` with a
stable code), can sign an outgoing one the same way (for the test kit, the demo
curl and ``idemhook send``), and supplies the source defaults a user should not
have to write: where the event ID and type are, whether the body is a batch,
which content types are accepted.

To add a scheme: write ``app/_config/schemes/<name>.py`` with a subclass decorated
``@register("<name>")`` and import it in ``app/_config/schemes/__init__.py``.
"""

from __future__ import annotations

import copy
import hmac
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from werkzeug.datastructures import Headers

from idemhook._config.parsing import parse_json
from idemhook._values.errors import ConfigError, Unauthorized
from idemhook._values.outcome import Outcome

#: Default freshness window for schemes that sign a timestamp (``tolerance_seconds``).
DEFAULT_TOLERANCE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class Delivery:
    """The parts of an HTTP request a scheme may sign or verify."""

    body: bytes
    headers: Headers = field(default_factory=Headers)
    method: str = "POST"
    #: The URL the sender called; on intake, filled in only for schemes with ``signs_url``.
    url: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer in the sender's own protocol; the intake turns it into the HTTP response.

    Schemes return this plain value rather than a Flask response, so that they stay
    free of the web framework and can be tested as functions.
    """

    status: int
    #: Bytes are sent as they are; any other value is encoded as JSON, as every JSON
    #: answer of the app is (so a str is sent as a JSON string, not as text).
    body: Any
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class Scheme:
    """Base class: verify and sign requests for one source."""

    name: ClassVar[str]
    #: Config keys this scheme reads besides the common ones (see app.sources).
    option_keys: ClassVar[frozenset[str]] = frozenset()
    #: Source settings used when the source's config does not give them.
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: Whether the scheme needs ``secret``.
    needs_secret: ClassVar[bool] = True
    #: Whether a source of this scheme may have ``tenants = true``: its requests are signed
    #: with a secret (an HMAC key or a password) that :meth:`verify` can be given per request.
    serves_tenants: ClassVar[bool] = True
    #: Whether the signature covers the URL the sender called (``Delivery.url``). Only
    #: then does the intake work the URL out; most schemes sign the body alone.
    signs_url: ClassVar[bool] = False
    #: Whether the source is an API served by :mod:`idemhook._web.operations` (the operation's own
    #: answer, replayed to retries) instead of the webhook intake.
    operation: ClassVar[bool] = False

    #: The prefix the provider writes before every secret (``whsec_``); a secret that is
    #: only the prefix is refused.
    secret_prefix: ClassVar[str] = ""

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        self.source = source
        # A source with tenants may have no secret of its own: only its tenants' endpoints.
        own = self.needs_secret and not (config.get("tenants") and config.get("secret") is None)
        entries = _resolve(source, config.get("secret")) if own else []
        self.secrets: tuple[str, ...] = tuple(value for _where, value in entries)
        #: The key each secret stands for, in the same order; never empty (checked here, once,
        #: so that no scheme can verify a request with an empty HMAC key).
        self.keys: tuple[bytes, ...] = tuple(self._key(where, value) for where, value in entries)

    def secret_key(self, secret: str) -> bytes:
        """The key ``secret`` stands for: its UTF-8 bytes, unless the provider encodes it."""
        return secret.encode()

    def with_keys(self, keys: Sequence[bytes]) -> Scheme:
        """A copy of this scheme that signs (and verifies) with ``keys``: a tenant's."""
        clone = copy.copy(self)
        clone.keys = tuple(keys)
        clone.keys_changed()
        return clone

    def keys_changed(self) -> None:
        """Recompute what a scheme derives from :attr:`keys` (after :meth:`with_keys`)."""

    def tenant_key(self, secret: str) -> bytes:
        """The key a tenant's ``secret`` stands for; :class:`ConfigError` if it cannot be one."""
        return self._key("a tenant's secret", secret)

    def _key(self, where: str, secret: str) -> bytes:
        prefix = self.secret_prefix
        if prefix and secret.startswith(prefix) and not secret[len(prefix) :].strip():
            raise ConfigError(
                f"[sources.{self.source}] {where}: is only the prefix {prefix!r}; copy the "
                "whole secret the provider shows"
            )
        key = self.secret_key(secret)
        if not key:
            raise ConfigError(
                f"[sources.{self.source}] {where}: decodes to zero bytes, which anyone could "
                "sign with; copy the whole secret the provider shows"
            )
        return key

    @property
    def secret_headers(self) -> tuple[str, ...]:
        """Headers this source signs with whose names ``safe_headers`` would not catch."""
        return ()

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        """Raise :class:`Unauthorized` unless the delivery is authentic; else which key matched.

        ``keys``: the keys to try (a tenant's live secrets); None: the source's own
        (:attr:`keys`). Returns the position in that list of the key that verified the
        delivery (0 for a scheme with no secrets), never the key itself. Every key is
        tried (:func:`match_index`), so the time taken tells nothing of which one matched.
        """
        raise NotImplementedError

    def sign(self, delivery: Delivery) -> dict[str, str]:
        """Return the headers that make ``delivery`` verify (signed with the first secret)."""
        raise NotImplementedError

    # Hooks for senders that are not "one signed JSON document, answered with JSON".
    # The intake calls them in this order: verify, preempt, parse, (claim), respond.

    def preempt(self, delivery: Delivery) -> Reply | None:
        """Answer a verified request without claiming it (GitHub's ``ping``); None: go on."""
        return None

    def parse(self, body: bytes) -> Any:
        """Turn the verified raw body into the payload events are read from (strict JSON)."""
        return parse_json(body)

    @property
    def parses_json(self) -> bool:
        """Whether :meth:`parse` is this class's: the body's own JSON text is its payload."""
        return type(self).parse is Scheme.parse

    def respond(self, outcomes: Sequence[Outcome]) -> Reply | None:
        """Answer in the sender's own protocol (Salesforce's SOAP ack); None: the JSON answer."""
        return None


SCHEMES: dict[str, type[Scheme]] = {}


def register(*names: str) -> Callable[[type[Scheme]], type[Scheme]]:
    """Class decorator: make a scheme available under ``names`` in ``[sources.x] scheme``."""

    def decorate(cls: type[Scheme]) -> type[Scheme]:
        cls.name = names[0]
        for name in names:
            if name in SCHEMES:
                raise RuntimeError(f"scheme {name!r} is registered twice")
            SCHEMES[name] = cls
        return cls

    return decorate


def resolve_secrets(source: str, value: Any, key: str = "secret") -> tuple[str, ...]:
    """Resolve ``secret`` (or the setting ``key``): a literal, ``env:NAME``, or a list of them."""
    return tuple(secret for _where, secret in _resolve(source, value, key))


def _resolve(source: str, value: Any, key: str = "secret") -> list[tuple[str, str]]:
    """Each secret with the words that name it in an error (``secret[2] (env:NAME)``).

    Refuses an empty or whitespace-only secret, literal or from the environment:
    a key nobody has to guess would let anyone sign requests. ``key`` is the
    setting that holds the value (``clients.acme`` for a client's secret).
    """
    if value is None:
        raise ConfigError(f"[sources.{source}] {key}: missing; give a literal or env:NAME")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"[sources.{source}] {key}: the list is empty")
    entries = []
    for index, item in enumerate(values, start=1):
        where = key if len(values) == 1 else f"{key}[{index}]"
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(
                f"[sources.{source}] {where}: must be a non-empty string, not only whitespace"
            )
        if item.startswith("env:"):
            name = item[4:]
            where = f"{where} (env:{name})"
            resolved = os.environ.get(name)
            if not resolved:
                raise ConfigError(
                    f"[sources.{source}] {key}: environment variable {name} is not set"
                )
            if not resolved.strip():
                raise ConfigError(
                    f"[sources.{source}] {where}: environment variable {name} holds only whitespace"
                )
            item = resolved
        entries.append((where, item))
    return entries


def matches_any(expected: Iterable[bytes | str], given: bytes | str) -> bool:
    """Constant-time check that ``given`` equals one of ``expected``.

    Every candidate is compared (no early exit), so the time taken does not tell
    which secret, or whether any, matched.
    """
    given_b = given.encode() if isinstance(given, str) else given
    found = False
    for candidate in expected:
        cand_b = candidate.encode() if isinstance(candidate, str) else candidate
        found |= hmac.compare_digest(cand_b, given_b)
    return found


def match_index(expected: Sequence[bytes | str], given: bytes | str) -> int:
    """The position in ``expected`` of the one equal to ``given`` (first of equals), else -1.

    Constant-time as :func:`matches_any`: every candidate is compared, with no early exit.
    """
    given_b = given.encode() if isinstance(given, str) else given
    found = -1
    for index, candidate in enumerate(expected):
        cand_b = candidate.encode() if isinstance(candidate, str) else candidate
        equal = hmac.compare_digest(cand_b, given_b)
        found = index if equal and found < 0 else found
    return found


def require_header(delivery: Delivery, name: str) -> str:
    value = delivery.headers.get(name)
    if not value:
        raise Unauthorized(
            f"The {name} header is missing: the sender must sign each request.",
            code="missing_signature",
        )
    return value


def positive_int_option(source: str, config: Mapping[str, Any], key: str, default: int) -> int:
    """Read a positive whole-number option, raising :class:`ConfigError` naming the key."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"[sources.{source}] {key}: must be a positive whole number")
    return value


def check_freshness(timestamp: str, *, tolerance: int, header: str, unit: int = 1) -> None:
    """Reject a signed timestamp (``unit`` per second) further than ``tolerance`` s from now.

    Called only after the signature matched, so ``stale_timestamp`` always means
    "authentic but too old (or from the future)": a replay, or a skewed clock.
    """
    try:
        sent = int(timestamp.strip())
    except ValueError:
        raise Unauthorized(
            f"The {header} header is not a whole number.", code="invalid_signature"
        ) from None
    # Whole units throughout: a signed but absurd timestamp must not overflow a float.
    skew = int(time.time() * unit) - sent
    if abs(skew) > tolerance * unit:
        when = "old" if skew > 0 else "in the future"
        seconds = abs(skew) // unit
        shown = f"{seconds} s {when}" if seconds < 10**12 else f"absurdly {when}"
        raise Unauthorized(
            f"The signed timestamp in {header} is {shown}; this source accepts "
            f"at most {tolerance} s (tolerance_seconds). Check the server clock, or this is a "
            "replayed request.",
            code="stale_timestamp",
        )


def invalid(header: str, hint: str = "") -> Unauthorized:
    """The error for a signature that does not match (never says which part was wrong)."""
    return Unauthorized(
        f"The {header} signature does not match: check that this source's secret is the one "
        f"the sender signs with{hint}.",
        code="invalid_signature",
    )
