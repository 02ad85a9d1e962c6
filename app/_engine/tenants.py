"""Tenants' secrets on a delivery's path, and the tally of which secret verified each one.

:class:`Tenants` finds the keys a delivery to ``POST /webhooks/<source>/<tenant>`` is
verified with: that tenant's live secrets, read from ``source_secrets`` by one indexed
SELECT per delivery, so a secret added, expired or removed applies to the next delivery in
every process, with nothing to invalidate. The decrypted key of each stored token is kept
(a token never changes: a re-encrypted secret is a new token).

:class:`Matches` counts, in process, which secret verified each delivery (a static
secret's position in the source's list, or a tenant secret's id) and writes the tallies
from a background thread about once a second, and at exit: one statement per secret
seen, never one per delivery, so the hot path pays a deque append.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from idemhook._config.secrets import SecretBox
from idemhook._config.sources import Source, valid_tenant
from idemhook._store import source_secrets as store
from idemhook._store.database import Database, unavailable_when_lost
from idemhook._values.errors import ConfigError, NotFound, Unauthorized

log = logging.getLogger("idemhook.tenants")

#: How often each process writes its tallies of matched secrets.
FLUSH_SECONDS = 1.0
#: Decrypted keys kept per process before the cache starts over.
MAX_CACHED_KEYS = 10_000


def static_label(index: int | tuple[str, int]) -> str:
    """How a static secret is named: its position from 1 (``2``), or a client's (``acme:2``)."""
    if isinstance(index, tuple):
        return f"{index[0]}:{index[1] + 1}"
    return str(index + 1)


def tenant_label(secret_id: int) -> str:
    """How a tenant secret is named in the metric and the tallies: ``id:<id>``."""
    return f"id:{secret_id}"


class Matches:
    """Which secret verified each delivery: noted here, counted and written about once a second.

    A delivery only appends ``(source, secret)`` to a deque (atomic, no lock: about a
    tenth of a microsecond); the flush thread drains it, adds the counts to the metric
    (:attr:`observers`) and writes one statement per secret seen, with the flush's time as
    the last match (so ``last_matched_at`` is exact to about a second).
    """

    def __init__(self, database: Database, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.database = database
        self.flush_seconds = flush_seconds
        #: Called with ``(source, label, count)`` at each flush, per secret seen (the metric).
        self.observers: list[Callable[[str, str, int], None]] = []
        self._static: deque[tuple[str, int | tuple[str, int]]] = deque()
        self._tenants: deque[tuple[str, int]] = deque()
        #: Counts a failed write left for the next flush.
        self._unwritten_static: dict[tuple[str, str], list] = {}
        self._unwritten_tenants: dict[int, list] = {}
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        os.register_at_fork(after_in_child=functools.partial(_forked, weakref.ref(self)))

    def static(self, source: str, index: int) -> None:
        """The source's own secret at ``index`` (0-based) verified a delivery."""
        self._static.append((source, index))
        if self._thread is None:
            self._start()

    def client(self, source: str, client: str | None, index: int) -> None:
        """An ``idempotency-key`` source's client's secret at ``index`` verified a request
        (None: the anonymous client of ``secret``, counted as a static secret)."""
        self._static.append((source, index if client is None else (client, index)))
        if self._thread is None:
            self._start()

    def tenant(self, source: str, secret_id: int) -> None:
        """The tenant secret ``secret_id`` verified a delivery."""
        self._tenants.append((source, secret_id))
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        # Once per process: a forked child forgets its parent's thread (_forked).
        with self._flushing:
            if self._thread is not None:
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            # The thread and the exit hook hold the tally weakly: a dropped app's thread ends.
            ref = weakref.ref(self)
            self._thread = threading.Thread(
                target=_run,
                args=(ref, self._stop, self.flush_seconds),
                name="idemhook-secret-matches",
                daemon=True,
            )
            self._thread.start()
        atexit.register(_at_exit, ref)

    def flush(self, *, quiet: bool = False) -> None:
        """Count what was noted since the last flush and write it (one statement per secret)."""
        with self._flushing:
            now = datetime.now(UTC)
            static = _drain(self._static)
            tenants = _drain(self._tenants)
            for (source, index), count in static.items():
                label = static_label(index)
                for observe in self.observers:
                    observe(source, label, count)
                _add(self._unwritten_static, (source, label), count, now)
            for (source, secret_id), count in tenants.items():
                for observe in self.observers:
                    observe(source, tenant_label(secret_id), count)
                _add(self._unwritten_tenants, secret_id, count, now)
            if not self._unwritten_static and not self._unwritten_tenants:
                return
            try:
                # On the connection kept beside the lanes (Database.reserve): the flush never
                # waits behind request threads for a pooled connection, nor opens one.
                with self.database.reserve.begin() as connection:
                    store.record_matches(
                        connection,
                        {key: store.Tally(*v) for key, v in self._unwritten_static.items()},
                        {key: store.Tally(*v) for key, v in self._unwritten_tenants.items()},
                    )
            except SQLAlchemyError as exc:
                # Kept for the next flush: a database away for a while loses no count.
                if not quiet:
                    log.warning("could not record which secrets matched (%s); retrying", exc)
                return
            self._unwritten_static.clear()
            self._unwritten_tenants.clear()

    def close(self, *, quiet: bool = False) -> None:
        """Stop the thread and write what is left (at exit, and when an app is dropped)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self.flush(quiet=quiet)


def _drain(noted: deque) -> dict[tuple[str, Any], int]:
    # Only the flush pops (from the left) while deliveries append (on the right): safe.
    counts: dict[tuple[str, Any], int] = {}
    for _ in range(len(noted)):
        key = noted.popleft()
        counts[key] = counts.get(key, 0) + 1
    return counts


def _add(unwritten: dict, key: object, count: int, now: datetime) -> None:
    tally = unwritten.get(key)
    if tally is None:
        unwritten[key] = [count, now]
    else:
        tally[0] += count
        tally[1] = now


def _forked(ref: weakref.ref[Matches]) -> None:
    matches = ref()
    if matches is not None:  # the parent's thread did not come along
        matches._thread = None
        matches._static.clear()
        matches._tenants.clear()
        matches._unwritten_static.clear()
        matches._unwritten_tenants.clear()
        matches._flushing = threading.Lock()


def _run(ref: weakref.ref[Matches], stop: threading.Event, seconds: float) -> None:
    while not stop.wait(seconds):
        matches = ref()
        if matches is None:
            return
        matches.flush()
        del matches


def _at_exit(ref: weakref.ref[Matches]) -> None:
    # At exit the log's streams may be closed already; a count that cannot be written then
    # is lost either way.
    matches = ref()
    if matches is not None and matches._pid == os.getpid():
        matches.close(quiet=True)


class Tenants:
    """A tenant's live keys for a delivery, and the record of which one verified it."""

    def __init__(self, database: Database, box: SecretBox | None, matches: Matches) -> None:
        self.database = database
        self.box = box
        self.matches = matches
        self._keys: dict[bytes, bytes] = {}

    def keys_for(self, source: Source, tenant: str) -> tuple[Sequence[int], Sequence[bytes]]:
        """The ids and keys of ``tenant``'s live secrets (404 ``unknown_tenant``, 401
        ``no_live_secret``)."""
        if not source.tenants or not valid_tenant(tenant):
            raise unknown_tenant(source, tenant)
        with unavailable_when_lost():  # a lost database: 503, as a claim's would be
            rows = store.of_tenant(self.database.engine, source.name, tenant)
        if not rows:
            raise unknown_tenant(source, tenant)
        now = datetime.now(UTC)
        live = [row for row in rows if row.expires_at is None or row.expires_at > now]
        if not live:
            raise Unauthorized(
                f"Every secret of tenant {tenant!r} of source {source.name!r} has expired; add "
                f"one with `idemhook secrets add {source.name} {tenant}` (docs/operations.md).",
                code="no_live_secret",
            )
        return [row.id for row in live], [self._key(source, row) for row in live]

    def _key(self, source: Source, row: store.StoredSecret) -> bytes:
        key = self._keys.get(row.token)
        if key is None:
            try:
                if self.box is None:
                    raise ConfigError(
                        "IDEMHOOK_SECRETS_KEY is not set, and tenant secrets are stored; set it"
                    )
                key = source.scheme.tenant_key(self.box.decrypt(row.token))
            except ConfigError as exc:
                # Said here, with the secret's id: the error handler logs no exception's text.
                log.error("tenant secret %s of source %r: %s", row.id, source.name, exc)
                raise
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[row.token] = key
        return key


def unknown_tenant(source: Source, tenant: str) -> NotFound:
    """404 ``unknown_tenant``: no secret is stored for this tenant (or the name is not one)."""
    if not source.tenants:
        message = (
            f"Source {source.name!r} has no tenants; its deliveries go to "
            f"/webhooks/{source.name} (or set tenants = true)."
        )
    elif tenant and not valid_tenant(tenant):
        message = "A tenant's name is 1-64 letters, digits, '.', '_', '-' or '@'; this one is not."
    elif not tenant:
        message = (
            f"Source {source.name!r} has no secret of its own: deliveries go to "
            f"/webhooks/{source.name}/<tenant>."
        )
    else:
        message = (
            f"Source {source.name!r} has no tenant {tenant!r}; add its secret with "
            f"`idemhook secrets add {source.name} {tenant}`."
        )
    return NotFound(message, code="unknown_tenant")
