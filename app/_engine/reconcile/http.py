"""Calling a provider's API within a run: its limits honoured, its errors one clear line.

What each answer means is one pure function, :func:`verdict`, following the providers'
documentation and their official SDKs:

- **2xx**: the answer.
- **401, and 403 that is not a rate limit**: the key or token was refused; the run ends
  (outcome ``refused``): retrying cannot help until someone fixes the key.
- **429, and GitHub's 403 rate limit** (``x-ratelimit-remaining: 0``, or a secondary
  limit): wait ``retry-after`` seconds if given, else until ``x-ratelimit-reset`` (UTC
  epoch seconds) when the remaining count is 0, else (a GitHub secondary limit) a
  minute, else (Stripe) an exponential backoff with jitter as Stripe's SDK does. A wait
  longer than :data:`MAX_WAIT` ends the run with a clear error instead: the next run
  continues.
- **5xx, Stripe's 409, a lost connection or a timeout**: tried again with backoff
  (0.5 s doubling, up to :data:`MAX_TRIES` tries), unless Stripe says
  ``Stripe-Should-Retry: false``.
- **Anything else** (a 404 for a hook that does not exist): the run ends with the
  provider's own message.

The credential travels only in the ``Authorization`` header of requests to the
configured ``api_base`` (a pagination link elsewhere is refused), and appears in no
message, log line or stored error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import requests

log = logging.getLogger("idemhook.reconcile")

#: Tries of one request that failed with a 5xx, a lost connection or a timeout.
MAX_TRIES = 5
#: The first backoff (seconds); it doubles with each try, up to :data:`MAX_BACKOFF`.
BASE_DELAY = 0.5
MAX_BACKOFF = 8.0
#: The longest a run waits for a rate limit before it ends with an error instead.
MAX_WAIT = 60.0
#: A GitHub secondary rate limit without ``retry-after``: wait at least a minute.
SECONDARY_WAIT = 60.0
#: Connect and read timeouts of every request (seconds).
TIMEOUT = (10.0, 30.0)


class ProviderError(Exception):
    """The run cannot go on: the provider refused, failed or rate-limited it."""

    #: ``reconcile_runs.outcome`` of a run it ends.
    outcome = "failed"


class Refused(ProviderError):
    """The provider refused the API key or token (401, or 403 that is no rate limit)."""

    outcome = "refused"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do about one answer."""

    #: ``ok``, ``wait`` (then try again), ``refused`` or ``failed``.
    action: str
    seconds: float = 0.0
    message: str = ""


def verdict(
    provider: str,
    status: int,
    headers: Mapping[str, str],
    message: str,
    tries: int,
    now: float,
) -> Verdict:
    """What to do about an answer with ``status``/``headers`` on try number ``tries``.

    ``headers`` is looked up case-insensitively by the caller (requests' headers are);
    ``message`` is the provider's own error text, ``now`` the time (epoch seconds).
    """
    if 200 <= status < 300:
        return Verdict("ok")
    credential = "API key" if provider == "stripe" else "token"
    limited = _rate_limit_wait(provider, status, headers, message, tries, now)
    if limited is not None:
        return Verdict("wait", limited, f"rate limited (HTTP {status})")
    if status in (401, 403):
        # Not the provider's message: Stripe's quotes part of the key it refused.
        why = "invalid or revoked" if status == 401 else "it lacks the permission to read this"
        return Verdict("refused", message=f"the {credential} was refused (HTTP {status}: {why})")
    retryable = status >= 500 or (provider == "stripe" and status == 409)
    if provider == "stripe" and headers.get("stripe-should-retry") == "false":
        retryable = False
    if retryable and tries < MAX_TRIES:
        return Verdict("wait", backoff(tries), f"HTTP {status}")
    if retryable:
        return Verdict("failed", message=f"HTTP {status}, {tries} times ({message})")
    return Verdict("failed", message=f"HTTP {status} ({message})")


def _rate_limit_wait(
    provider: str,
    status: int,
    headers: Mapping[str, str],
    message: str,
    tries: int,
    now: float,
) -> float | None:
    """Seconds to wait for a rate limit, or None when the answer is no rate limit."""
    if status not in (403, 429):
        return None
    retry_after = _number(headers.get("retry-after"))
    if retry_after is not None:
        return max(0.0, retry_after)
    if headers.get("x-ratelimit-remaining") == "0":
        reset = _number(headers.get("x-ratelimit-reset"))
        if reset is not None:
            return max(0.0, reset - now)
    if provider == "github":
        if status == 429 or "secondary rate" in message.lower():
            return SECONDARY_WAIT
        return None  # a 403 that is no rate limit: the token lacks the permission
    if status == 429:
        if headers.get("stripe-should-retry") == "false":
            return None
        return backoff(tries)
    return None


def backoff(tries: int) -> float:
    """Seconds before try ``tries + 1``: doubling from :data:`BASE_DELAY`, jittered as the
    Stripe SDK does (between half and all of the step, never under the base)."""
    step = min(MAX_BACKOFF, BASE_DELAY * 2 ** max(tries - 1, 0))
    return max(BASE_DELAY, step * (0.5 + random.uniform(0, 0.5)))


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


class ProviderHTTP:
    """GET requests to one provider's API, as :func:`verdict` says.

    ``wait(seconds, why)`` sleeps for the run (which renews its lease meanwhile, and
    raises to stop it when its worker is stopping).
    """

    def __init__(
        self,
        provider: str,
        api_base: str,
        headers: Mapping[str, str],
        wait: Callable[[float, str], None],
    ) -> None:
        self.provider = provider
        self.api_base = api_base
        self._origin = _origin(api_base)
        self._wait = wait
        # requests (and urllib3) are imported when a run first calls a provider, not when
        # the app is built: every gunicorn worker builds it and never reconciles, and their
        # modules, kept alive, cost each delivery about 1 % more instructions
        # (bench.instructions, receiver: +17,000 with them imported, from the collector's
        # walks over more objects).
        import requests

        self._requests = requests
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": _user_agent(), **headers})

    def close(self) -> None:
        self.session.close()

    def get(self, url: str, params: Mapping[str, Any] | None = None) -> requests.Response:
        """GET ``url`` (under ``api_base``) until the answer is usable, or raise ProviderError."""
        if _origin(url) != self._origin:
            raise ProviderError(
                f"the provider pointed to {urlsplit(url).netloc or url!r}, outside api_base "
                f"({self.api_base}); not followed"
            )
        tries = 0
        while True:
            tries += 1
            try:
                response = self.session.get(url, params=params, timeout=TIMEOUT)
            except self._requests.RequestException as exc:
                what = f"cannot reach {urlsplit(url).netloc} ({type(exc).__name__})"
                if tries >= MAX_TRIES:
                    raise ProviderError(f"{what}, {tries} times") from None
                self._wait(backoff(tries), what)
                continue
            found = verdict(
                self.provider,
                response.status_code,
                response.headers,
                _message(response),
                tries,
                time.time(),
            )
            if found.action == "ok":
                return response
            if found.action == "refused":
                raise Refused(found.message)
            if found.action == "failed":
                raise ProviderError(found.message)
            if found.seconds > MAX_WAIT:
                until = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + found.seconds))
                raise ProviderError(
                    f"{found.message}: the provider asks to wait {found.seconds:.0f} s (until "
                    f"{until}), longer than a run waits ({MAX_WAIT:.0f} s); the next run goes on"
                )
            if tries >= MAX_TRIES + 5:  # rate limits one after the other: give up for now
                raise ProviderError(f"{found.message} {tries} times in a row")
            log.info(
                "reconcile %s: %s; trying again in %.1f s",
                self.provider,
                found.message,
                found.seconds,
            )
            self._wait(found.seconds, found.message)

    def get_json(self, url: str, params: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
        """GET ``url``; its JSON body and the response (for its headers)."""
        response = self.get(url, params)
        try:
            return response.json(), response
        except ValueError:
            raise ProviderError(
                f"the provider answered HTTP {response.status_code} with a body that is not JSON"
            ) from None


def _message(response: requests.Response) -> str:
    """The provider's own error text (Stripe: ``error.message``; GitHub: ``message``)."""
    try:
        body = response.json()
    except ValueError:
        return (response.reason or "").strip()[:200]
    text = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            text = error.get("message")
        text = text or body.get("message")
    return str(text or response.reason or "").strip()[:200]


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _user_agent() -> str:
    try:
        return f"idemhook/{version('idemhook')} (reconcile)"
    except PackageNotFoundError:  # a source tree that was never installed
        return "idemhook (reconcile)"
