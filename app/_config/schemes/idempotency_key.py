"""``idempotency-key``: your own API, whose clients name each request with ``Idempotency-Key``.

A source of this scheme is served in API form (:mod:`idemhook._web.operations`): at ``POST <path>``
as well as ``POST /webhooks/<source>``, answered with the operation's own response,
replayed to every retry (docs/idempotency-keys.md). This module holds what is the
scheme's alone: who the client is, what the key is, and the request's fingerprint.

Clients authenticate either by HMAC (``auth = "hmac"``, the default):
``<signature_header>: sha256=<hex HMAC-SHA256(secret, key + "." + raw body)>``,
where ``key`` is the ``Idempotency-Key`` header's value as sent, which binds the key
to the body so a captured body cannot be re-keyed; or by a bearer token
(``auth = "bearer"``): ``Authorization: Bearer <secret>``. ``secret`` is one
anonymous client; ``clients`` names several (``acme = "env:ACME_TOKEN"``): the
bearer token picks the client, or, with HMAC, the ``client_header`` (``X-Client``)
names it and its secret must have signed the request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from idemhook._config.schemes.base import (
    Delivery,
    Scheme,
    _resolve,
    invalid,
    match_index,
    register,
    require_header,
)
from idemhook._values.errors import BadRequest, ConfigError, Unauthorized

KEY_HEADER = "Idempotency-Key"
DEFAULT_CLIENT_HEADER = "X-Client"
DEFAULT_KEY_TTL = "24h"
#: The longest key accepted (Stripe's limit; the IETF draft sets none).
MAX_KEY_LENGTH = 255
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A bare key: visible ASCII without '"' and ',' (what Stripe's clients send).
_BARE_KEY = re.compile(r"^[!#-+\--~]+$")
_TTL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_TTL_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: A path an API is served at: absolute, no route variables, no query or fragment.
_PATH = re.compile(r"^/[^<>\s?#]+$")


@register("idempotency-key")
class IdempotencyKey(Scheme):
    """Stripe-style idempotency keys from your own clients; the source answers as an API."""

    option_keys = frozenset(
        {
            "auth",
            "signature_header",
            "clients",
            "client_header",
            "path",
            "key_ttl",
            "fingerprint",
            "replay_errors",
        }
    )
    defaults = {"event_id": f"header:{KEY_HEADER}"}
    operation = True
    serves_tenants = False

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        where = f"[sources.{source}]"
        clients = config.get("clients")
        if clients is not None and "secret" in config:
            raise ConfigError(
                f"{where} secret and clients: give one; secret is a single anonymous client, "
                "clients names each one"
            )
        if clients is None:
            super().__init__(source, config)
            #: Client name (None: the anonymous one) -> the keys that stand for it.
            self.clients: dict[str | None, tuple[bytes, ...]] = {None: self.keys}
            self._secrets: dict[str | None, tuple[str, ...]] = {None: self.secrets}
        else:
            self.source = source
            self.clients, self._secrets = self._named_clients(clients)
            self.secrets = tuple(s for secrets in self._secrets.values() for s in secrets)
            self.keys = tuple(k for keys in self.clients.values() for k in keys)
        self.auth = config.get("auth", "hmac")
        if self.auth not in ("hmac", "bearer"):
            raise ConfigError(f"{where} auth: 'hmac' or 'bearer'")
        self.header = _header_option(config, "signature_header", "X-Signature", where)
        self.client_header = _header_option(config, "client_header", DEFAULT_CLIENT_HEADER, where)
        if "client_header" in config and (clients is None or self.auth != "hmac"):
            raise ConfigError(
                f"{where} client_header: only for auth = 'hmac' with clients (a bearer token "
                "names its client itself)"
            )
        self.path = _path_option(config.get("path"), where)
        self.key_ttl = parse_ttl(config.get("key_ttl", DEFAULT_KEY_TTL), where)
        fingerprint = config.get("fingerprint", True)
        if not isinstance(fingerprint, bool):
            raise ConfigError(f"{where} fingerprint: must be true or false")
        self.fingerprint = fingerprint
        replay_errors = config.get("replay_errors", False)
        if not isinstance(replay_errors, bool):
            raise ConfigError(f"{where} replay_errors: must be true or false")
        #: Store an operation that failed (500) and replay it, as Stripe does.
        self.replay_errors = replay_errors
        if config.get("event_id", self.defaults["event_id"]) != self.defaults["event_id"]:
            raise ConfigError(
                f"{where} event_id: an idempotency-key source is keyed by the {KEY_HEADER} "
                "header (and its client); leave event_id out"
            )
        if config.get("batch", "none") != "none":
            raise ConfigError(f"{where} batch: an API request is one operation; leave batch out")

    def _named_clients(
        self, clients: Any
    ) -> tuple[dict[str | None, tuple[bytes, ...]], dict[str | None, tuple[str, ...]]]:
        where = f"[sources.{self.source}] clients"
        if not isinstance(clients, Mapping) or not clients:
            raise ConfigError(
                f'{where}: a table of client names and secrets, e.g. acme = "env:ACME_TOKEN"'
            )
        keys: dict[str | None, tuple[bytes, ...]] = {}
        secrets: dict[str | None, tuple[str, ...]] = {}
        unresolved = []
        for name, value in clients.items():
            if not CLIENT_NAME.match(name):
                raise ConfigError(
                    f"{where}.{name}: a client name is 1-64 letters, digits, '.', '_' or '-'"
                )
            try:
                entries = _resolve(self.source, value, key=f"clients.{name}")
            except ConfigError as exc:  # named together, so one run finds every unset one
                unresolved.append(str(exc))
                continue
            secrets[name] = tuple(secret for _where, secret in entries)
            keys[name] = tuple(self._key(where_, secret) for where_, secret in entries)
        if unresolved:
            raise ConfigError("; ".join(unresolved))
        seen: dict[str, str] = {}
        for name, values in secrets.items():
            for secret in values:
                other = seen.setdefault(secret, str(name))
                if other != name:
                    raise ConfigError(
                        f"{where}.{name}: the same secret as {other}; each client needs its "
                        "own, or one could act as the other"
                    )
        return keys, secrets

    # -- who is calling --------------------------------------------------------------------------

    @property
    def named_clients(self) -> bool:
        return None not in self.clients

    def authenticate(self, delivery: Delivery) -> str | None:
        """The client that sent ``delivery`` (None: the anonymous one); 401 if nobody did."""
        return self.authenticate_which(delivery)[0]

    def authenticate_which(self, delivery: Delivery) -> tuple[str | None, int]:
        """The client that sent ``delivery`` and the position of its secret that matched."""
        if self.auth == "bearer":
            return self._bearer_client(delivery)
        given = require_header(delivery, self.header).strip().lower()
        if not given.startswith("sha256="):
            given = "sha256=" + given
        client: str | None = None
        if self.named_clients:
            client = delivery.headers.get(self.client_header, "").strip()
            if not client:
                raise Unauthorized(
                    f"Send {self.client_header}: <client name> with the request: this source's "
                    "clients each sign with their own secret.",
                    code="missing_credentials",
                )
        keys = self.clients.get(client, ())
        # A missing key is signed as empty: an unauthenticated caller gets 401, never the
        # 400 about the key, which only an authentic request (of any client) is told.
        key = delivery.headers.get(KEY_HEADER, "")
        digests = [_digest(k, key, delivery.body) for k in keys]
        index = match_index(digests, given) if keys else -1
        if index < 0:
            hint = f" (for the client named in {self.client_header})" if client else ""
            raise invalid(self.header, f"{hint}, over the {KEY_HEADER} header, '.', and the body")
        return client, index

    def _bearer_client(self, delivery: Delivery) -> tuple[str | None, int]:
        given = delivery.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _bearer_error(
                "Send Authorization: Bearer <token> with your client's token.",
                "missing_credentials",
            )
        token = token.strip()
        found: list[tuple[str | None, int]] = []
        # Every client's every token is compared: the time taken says nothing of which matched.
        for client, secrets in self._secrets.items():
            index = match_index(secrets, token)
            if index >= 0:
                found.append((client, index))
        if not found:
            raise _bearer_error(
                "The bearer token does not match any client of this source.",
                "invalid_credentials",
            )
        return found[0]

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        return self.authenticate_which(delivery)[1]

    # -- signing (the test kit, `idemhook sign` and `send`) --------------------------------------

    def sign(self, delivery: Delivery) -> dict[str, str]:
        """Sign as the first client (the anonymous one, with ``secret``)."""
        return self.sign_as(delivery, next(iter(self.clients)))

    def sign_as(self, delivery: Delivery, client: str | None) -> dict[str, str]:
        """The headers that make ``delivery`` verify as ``client``'s (a random key if none)."""
        if client not in self.clients:
            names = ", ".join(str(c) for c in self.clients if c is not None) or "none"
            raise KeyError(
                f"source {self.source!r} has no client {client!r} (its clients: {names})"
            )
        key = delivery.headers.get(KEY_HEADER)
        if key is None:
            key = str(uuid.uuid4())
        headers = {KEY_HEADER: key}
        if self.auth == "bearer":
            headers["Authorization"] = f"Bearer {self._secrets[client][0]}"
        else:
            headers[self.header] = _digest(self.clients[client][0], key, delivery.body)
            if client is not None:
                headers[self.client_header] = client
        return headers

    # -- the key and the request's fingerprint ---------------------------------------------------

    def event_id(self, client: str | None, key: str) -> str:
        """The stored ``event_id``: the key, scoped by its client (``acme:<key>``)."""
        return key if client is None else f"{client}:{key}"

    def fingerprint_of(self, method: str, path: str, content_type: str, body: bytes) -> str | None:
        """``sha256:<hex>`` of what makes two requests the same; None when turned off."""
        if not self.fingerprint:
            return None
        digest = hashlib.sha256()
        for part in (method, path, content_type):
            digest.update(part.encode("latin-1", "replace") + b"\n")
        digest.update(body)
        return "sha256:" + digest.hexdigest()


def parse_key(value: str | None) -> str:
    """The key an ``Idempotency-Key`` header carries, or the documented 400.

    The IETF draft makes the header a Structured Field String (``"8e03..."``: its
    content is the key); Stripe's clients send the bare value (1-255 visible ASCII
    characters without commas or quotes), which is its own key.
    """
    if value is None:
        raise BadRequest(
            f"Send an {KEY_HEADER} header: a unique value per operation (a UUID), the same "
            "on every retry of it.",
            code="missing_idempotency_key",
        )
    value = value.strip(" \t")
    if value.startswith('"'):
        key, problem = _sf_string(value)
    elif _BARE_KEY.match(value):
        key, problem = value, None
    elif not value:
        key, problem = "", "is empty"
    else:
        key, problem = (
            "",
            (
                "holds a character a bare key may not (a control character, space, comma, quote "
                'or non-ASCII); send it as a quoted string, "like this", or a UUID'
            ),
        )
    if problem is None and not key:
        problem = "is empty"
    if problem is None and len(key) > MAX_KEY_LENGTH:
        problem = f"is {len(key)} characters long (at most {MAX_KEY_LENGTH})"
    if problem is not None:
        raise BadRequest(f"The {KEY_HEADER} header {problem}.", code="invalid_idempotency_key")
    return key


def _sf_string(value: str) -> tuple[str, str | None]:
    """Parse an RFC 8941 String that is the whole header; (content, problem)."""
    chars: list[str] = []
    escaped = False
    for index, char in enumerate(value[1:], start=1):
        if not " " <= char <= "~":
            return "", "holds a control character or non-ASCII, which no quoted string may"
        if escaped:
            if char not in '"\\':
                return "", "has a backslash before something other than '\"' or '\\'"
            chars.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            if index != len(value) - 1:
                return "", "has something after its closing quote (parameters are not accepted)"
            return "".join(chars), None
        else:
            chars.append(char)
    return "", "opens a quoted string that never closes"


def parse_ttl(value: Any, where: str = "") -> int:
    """``key_ttl``: ``90s``, ``15m``, ``24h`` or ``7d``, in whole seconds (at least 1)."""
    match = _TTL.match(value) if isinstance(value, str) else None
    seconds = int(match.group(1)) * _TTL_SECONDS[match.group(2)] if match else 0
    if seconds < 1:
        raise ConfigError(f"{where} key_ttl: a duration like '24h', '15m', '90s' or '7d'")
    return seconds


def _path_option(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _PATH.match(value):
        raise ConfigError(
            f"{where} path: an absolute URL path such as '/v1/emails' (no '<', '>', spaces, "
            f"query or fragment), got {value!r}"
        )
    return value.rstrip("/") or value


def _header_option(config: Mapping[str, Any], key: str, default: str, where: str) -> str:
    header = config.get(key, default)
    if not isinstance(header, str) or not header or any(c in header for c in " :\t\r\n"):
        raise ConfigError(f"{where} {key}: must be a header name")
    return header


def _digest(secret: bytes, key: str, body: bytes) -> str:
    signed = key.encode("latin-1", "replace") + b"." + body
    return "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()


def _bearer_error(message: str, code: str) -> Unauthorized:
    error = Unauthorized(message, code=code)
    error.headers["WWW-Authenticate"] = 'Bearer realm="idemhook"'
    return error
