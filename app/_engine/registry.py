"""The handler API: what plugin authors import, and how handlers are found and routed.

Contract (the full text with examples is ``docs/plugins.md``)::

    from idemhook import handler

    @handler("acme", "contact.updated")      # type may end in "*": "contact.*", "*"
    def sync_contact(event, db):
        db.execute(...)                       # same transaction as the event's claim
        return {"contact": 42}                # JSON-serialisable; stored as result

- ``event`` is an :class:`Event`; ``db`` is a SQLAlchemy ``Session`` inside the
  claim's transaction. Never commit, roll back or close it: the receiver commits
  the claim and every handler's work together, or none of it. Use it only during
  the call: it is emptied and handed to later events on the same connection.
- Raising rolls back the claim and all handlers' work for this event, records a
  row in ``delivery_failures`` and answers 500, so the provider retries and the
  handlers run again from scratch. Work outside the database (an API call) is
  therefore at least once, not exactly once: make it idempotent.
- Returning (or raising) :class:`Ignore` ``(reason)`` says "not for me": the
  handler's result is ``{"ignored": reason}``; when every handler that ran
  ignored the event it is recorded with status ``ignored`` (answered 200).
- Returning (or raising) :class:`Reject` ``(reason)`` says "this event can never
  succeed": every handler's work for the event is rolled back, later handlers do
  not run, the event is recorded with status ``rejected`` and result
  ``{"rejected": reason}``, a ``delivery_failures`` row with ``permanent = true``
  is written, and the answer is 200 so the provider stops retrying. A
  redelivery is a ``duplicate``.
- Returning :class:`Response` ``(status, body, headers)`` chooses the HTTP answer of an
  ``idempotency-key`` source (docs/idempotency-keys.md): it is stored with the key and
  replayed to every retry. ``body`` is the stored result; for webhook sources only the
  body counts.
- Several matching handlers all run, in registration order, in the one
  transaction. With one handler, ``result`` is its return value; with several,
  an object mapping each handler's ``module:qualname`` to its return value.
- A source of ``"*"`` matches every source.
- A source with ``freshness`` (docs/configuration.md#freshness) claims an event that is
  older than the version already applied to its object as ``stale``, and runs no
  handler for it, except those registered with ``@handler(source, type, stale=True)``:
  they see every event, and a stale one with ``event.stale == True``, in the same
  transaction (to append to an audit log, say). Every other handler never sees one.
- ``@handler(source, type, database_only=True)`` says the handler does nothing but
  statements on ``db``: a synchronous delivery whose every matching handler says so runs on
  the request thread, without the claim thread's hand-off, and is bounded by the statement
  and lock timeouts instead of answered ``503 handler_timeout`` (docs/plugins.md).

Side effects outside the database go through the outbox (docs/outbox.md): a
handler calls ``event.outbox.add(kind, payload, key=None)``, which inserts a
message in the claim's transaction, and ``idemhook worker`` hands each committed
message to the ``@sender(kind)`` function of its kind::

    @sender("email", max_attempts=10)
    def send_email(message):                  # an idemhook.Message
        smtp.send(..., message_id=message.key)
        return {"smtp": "250 OK"}             # stored as the message's result

Handlers and senders come from the modules listed in ``plugins`` in the sources
file and from the ``idemhook.handlers`` entry-point group: one loading path for
both, once, at start-up. A plugin module may set ``IDEMHOOK_MIGRATIONS`` to the folder of its
own Alembic revisions; installed plugins may instead register that folder in
the ``idemhook.migrations`` entry-point group. ``idemhook db upgrade`` applies both.
A plugin module may also set ``IDEMHOOK_BLUEPRINT`` to a Flask ``Blueprint`` of its
own routes (an API's ``GET``), registered by ``create_app`` after idemhook's own
routes; ``@api_view(source)`` (:mod:`idemhook._web.operations`) makes a view authenticate
that API source's clients.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import Any

from flask import Blueprint, Flask

from idemhook._contract import HandlerFunc, SenderFunc, Window
from idemhook._engine import outbox
from idemhook._values.errors import ConfigError

ENTRY_POINT_GROUP = "idemhook.handlers"
MIGRATIONS_GROUP = "idemhook.migrations"
#: Module attribute naming the folder of a plugin's own Alembic revisions.
MIGRATIONS_ATTRIBUTE = "IDEMHOOK_MIGRATIONS"
#: Module attribute holding a plugin's own routes: a Flask ``Blueprint``.
BLUEPRINT_ATTRIBUTE = "IDEMHOOK_BLUEPRINT"
_MARK = "__idemhook_handlers__"
_SENDER_MARK = "__idemhook_sender__"
_RECONCILER_MARK = "__idemhook_reconciler__"


ReconcilerFunc = Callable[[Window], Iterable[Any]]


def handler(
    source: str, event_type: str = "*", *, stale: bool = False, database_only: bool = False
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Mark ``func`` as the handler of ``event_type`` events from ``source``.

    ``stale=True``: also run it for stale events (``event.stale``), see the contract above.
    ``database_only=True``: the handler's author says it does nothing but statements on
    ``db`` (and ``event.outbox.add``), each bounded by the statement and lock timeouts, so
    a delivery whose every handler says so runs without the claim thread's watch
    (docs/plugins.md#database-only-handlers).
    """
    if not isinstance(stale, bool):
        raise TypeError("handler(source, event_type, stale=...): stale must be True or False")
    if not isinstance(database_only, bool):
        raise TypeError(
            "handler(source, event_type, database_only=...): database_only must be True or False"
        )
    if not isinstance(source, str) or not source:
        raise TypeError("handler(source, event_type): source must be a source name or '*'")
    if not isinstance(event_type, str) or not event_type:
        raise TypeError("handler(source, event_type): event_type must be a type or pattern")
    if "*" in event_type[:-1]:
        raise ValueError(f"event type pattern {event_type!r}: '*' may only end the pattern")

    def mark(func: HandlerFunc) -> HandlerFunc:
        if not callable(func):
            raise TypeError("@handler decorates a function")
        # Stacked decorators apply bottom-up; keep the order in which they are written.
        func.__dict__.setdefault(_MARK, []).insert(0, (source, event_type, stale, database_only))
        return func

    return mark


@dataclass(frozen=True, slots=True)
class Sender:
    """The function that delivers one kind of outbox message, and its retry policy."""

    kind: str
    func: SenderFunc
    #: Attempts before the message goes ``dead`` (a worker that dies holding it counts).
    max_attempts: int = 10
    #: How long a worker holds a message it took before another worker may take it.
    lease_seconds: float = 60.0
    #: The delay before the second attempt; it doubles with each attempt after (with jitter).
    backoff_seconds: float = 5.0
    #: The longest delay between two attempts.
    max_backoff_seconds: float = 3600.0

    @property
    def name(self) -> str:
        return f"{self.func.__module__}:{self.func.__qualname__}"


#: The retry policy of a sender: ``@sender`` arguments, or ``[outbox.<kind>]`` keys.
SENDER_POLICY = ("max_attempts", "lease_seconds", "backoff_seconds", "max_backoff_seconds")


def sender(
    kind: str,
    *,
    max_attempts: int = 10,
    lease_seconds: float = 60.0,
    backoff_seconds: float = 5.0,
    max_backoff_seconds: float = 3600.0,
) -> Callable[[SenderFunc], SenderFunc]:
    """Mark ``func`` as the sender of ``kind`` outbox messages (docs/outbox.md)."""
    outbox.check_kind(kind)
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise TypeError("sender(kind, max_attempts=...): a whole number of at least 1")
    for name, value in (
        ("lease_seconds", lease_seconds),
        ("backoff_seconds", backoff_seconds),
        ("max_backoff_seconds", max_backoff_seconds),
    ):
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise TypeError(f"sender(kind, {name}=...): a positive number of seconds")

    def mark(func: SenderFunc) -> SenderFunc:
        if not callable(func):
            raise TypeError("@sender decorates a function")
        setattr(
            func,
            _SENDER_MARK,
            Sender(
                kind,
                func,
                max_attempts=max_attempts,
                lease_seconds=float(lease_seconds),
                backoff_seconds=float(backoff_seconds),
                max_backoff_seconds=float(max_backoff_seconds),
            ),
        )
        return func

    return mark


def reconciler(source: str) -> Callable[[ReconcilerFunc], ReconcilerFunc]:
    """Mark ``func`` as the reconciler of ``source``: given a :class:`Window`, it yields the
    payloads of the events of that time, as the source would have received them
    (docs/reconcile.md)."""
    if not isinstance(source, str) or not source or source == "*":
        raise TypeError("reconciler(source): source must be the name of one source")

    def mark(func: ReconcilerFunc) -> ReconcilerFunc:
        if not callable(func):
            raise TypeError("@reconciler decorates a function")
        func.__dict__.setdefault(_RECONCILER_MARK, []).insert(0, source)
        return func

    return mark


@dataclass(frozen=True, slots=True)
class Reconciler:
    """A plugin's reconciler of one source (``@reconciler``)."""

    source: str
    func: ReconcilerFunc

    @property
    def name(self) -> str:
        return f"{self.func.__module__}:{self.func.__qualname__}"


@dataclass(frozen=True, slots=True)
class Registration:
    source: str
    pattern: str
    func: HandlerFunc
    #: Runs for stale events too (``@handler(..., stale=True)``).
    stale: bool = False
    #: Does nothing but database work (``@handler(..., database_only=True)``): needs no
    #: claim thread to watch it.
    database_only: bool = False

    @property
    def name(self) -> str:
        return f"{self.func.__module__}:{self.func.__qualname__}"

    def matches(self, source: str, event_type: str | None) -> bool:
        if self.source not in ("*", source):
            return False
        if self.pattern.endswith("*"):
            return (event_type or "").startswith(self.pattern[:-1])
        return self.pattern == event_type


class Registry:
    """Every registered handler, in registration order, with a per-type lookup cache."""

    def __init__(self, registrations: Iterable[Registration] = ()) -> None:
        self.registrations: list[Registration] = list(registrations)
        #: The sender of each outbox message kind (at most one per kind).
        self.senders: dict[str, Sender] = {}
        #: Folders of plugins' own Alembic revisions (``idemhook db upgrade`` applies them).
        self.migrations: list[Path] = []
        #: Plugins' own routes (``IDEMHOOK_BLUEPRINT``) and where each came from.
        self.blueprints: list[tuple[Blueprint, str]] = []
        #: The plugins' reconcilers (``@reconciler``), at most one per source.
        self.reconcilers: dict[str, Reconciler] = {}
        self._cache: dict[tuple[str, str | None], tuple[Registration, ...]] = {}

    def add(
        self,
        source: str,
        pattern: str,
        func: HandlerFunc,
        *,
        stale: bool = False,
        database_only: bool = False,
    ) -> None:
        # The same validation as the decorator.
        handler(source, pattern, stale=stale, database_only=database_only)
        self.registrations.append(Registration(source, pattern, func, stale, database_only))
        self._cache.clear()

    def for_event(self, source: str, event_type: str | None) -> tuple[Registration, ...]:
        key = (source, event_type)
        found = self._cache.get(key)
        if found is None:
            found = tuple(r for r in self.registrations if r.matches(source, event_type))
            if len(self._cache) < 10_000:  # types come from senders: bound the memory
                self._cache[key] = found
        return found

    def watch_needed(self, events: Iterable[Any]) -> bool:
        """Whether a delivery of ``events`` needs the claim thread's watch: False when every
        handler that could run for them was registered ``database_only=True`` (or none
        matches: the claim alone is SQL, bounded by the statement timeout)."""
        for event in events:
            for registration in self.for_event(event.source, event.type):
                if not registration.database_only:
                    return True
        return False

    def add_registration(self, registration: Registration) -> None:
        # A module listed in `plugins` and also installed as an entry point (or a
        # function decorated twice alike) must still run once per event.
        if registration not in self.registrations:
            self.registrations.append(registration)
            self._cache.clear()

    def merge(self, other: Registry) -> None:
        """Add everything ``other`` registered (``idemhook sources check`` loads plugins one
        at a time, so that every broken one is named)."""
        for registration in other.registrations:
            self.add_registration(registration)
        for found in other.senders.values():
            self.add_sender(found)
        for folder in other.migrations:
            if folder not in self.migrations:
                self.migrations.append(folder)
        for blueprint, where in other.blueprints:
            self.add_blueprint(blueprint, where)

    def add_blueprint(self, blueprint: Blueprint, where: str) -> None:
        if all(known is not blueprint for known, _where in self.blueprints):
            self.blueprints.append((blueprint, where))

    def add_sender(self, found: Sender, where: str = "") -> None:
        known = self.senders.get(found.kind)
        if known is not None and known != found:
            raise ConfigError(
                f"{where + ': ' if where else ''}sender {found.name} is registered for outbox "
                f"kind {found.kind!r}, which {known.name} already sends: one sender per kind"
            )
        self.senders[found.kind] = found

    def add_reconciler(self, found: Reconciler, where: str = "") -> None:
        known = self.reconcilers.get(found.source)
        if known is not None and known != found:
            raise ConfigError(
                f"{where + ': ' if where else ''}reconciler {found.name} is registered for "
                f"source {found.source!r}, which {known.name} already reconciles: one per source"
            )
        self.reconcilers[found.source] = found

    def configure_senders(self, tables: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply the sources file's ``[outbox.<kind>]`` retry policies to the senders."""
        for kind, table in tables.items():
            where = f"[outbox.{kind}]"
            unknown = set(table) - set(SENDER_POLICY)
            if unknown:
                raise ConfigError(
                    f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                    f"(known: {', '.join(SENDER_POLICY)})"
                )
            found = self.senders.get(kind)
            if found is None:
                known = ", ".join(sorted(self.senders)) or "none"
                raise ConfigError(
                    f"{where}: no @sender is registered for {kind!r} (senders: {known})"
                )
            policy = {name: getattr(found, name) for name in SENDER_POLICY} | dict(table)
            try:
                sender(kind, **policy)
            except TypeError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            self.senders[kind] = replace(
                found,
                max_attempts=int(policy["max_attempts"]),
                **{name: float(policy[name]) for name in SENDER_POLICY[1:]},
            )

    def check_sources(self, known: Iterable[str]) -> None:
        known = set(known)
        for reg in self.registrations:
            if reg.source != "*" and reg.source not in known:
                raise ConfigError(
                    f"handler {reg.name} is registered for source {reg.source!r}, which is not "
                    f"in the sources file (configured: {', '.join(sorted(known)) or 'none'})"
                )
        for found in self.reconcilers.values():
            if found.source not in known:
                raise ConfigError(
                    f"reconciler {found.name} is registered for source {found.source!r}, which "
                    f"is not in the sources file (configured: {', '.join(sorted(known)) or 'none'})"
                )


def collect_reconcilers(obj: Any) -> list[Reconciler]:
    """Reconcilers marked with ``@reconciler`` on ``obj`` (a module, or one function)."""
    candidates = vars(obj).values() if isinstance(obj, ModuleType) else [obj]
    found: list[Reconciler] = []
    for candidate in candidates:
        marks = getattr(candidate, _RECONCILER_MARK, None) if inspect.isroutine(candidate) else None
        for source in marks or ():
            item = Reconciler(source, candidate)
            if item not in found:
                found.append(item)
    return found


def collect_senders(obj: Any) -> list[Sender]:
    """Senders marked with ``@sender`` on ``obj`` (a module, or one function)."""
    candidates = vars(obj).values() if isinstance(obj, ModuleType) else [obj]
    found: list[Sender] = []
    for candidate in candidates:
        mark = getattr(candidate, _SENDER_MARK, None) if inspect.isroutine(candidate) else None
        if isinstance(mark, Sender) and mark not in found:
            found.append(mark)
    return found


def collect(obj: Any) -> list[Registration]:
    """Registrations marked with ``@handler`` on ``obj`` (a module, or one function)."""
    if isinstance(obj, ModuleType):
        candidates: Iterable[Any] = vars(obj).values()
    else:
        candidates = [obj]
    found = []
    seen: set[int] = set()
    for candidate in candidates:
        marks = getattr(candidate, _MARK, None) if inspect.isroutine(candidate) else None
        if marks and id(candidate) not in seen:
            seen.add(id(candidate))
            found.extend(
                Registration(src, pattern, candidate, stale, database_only)
                for src, pattern, stale, database_only in marks
            )
    return found


def load(
    modules: Iterable[str],
    *,
    entry_points: Iterable[Any] | None = None,
    migration_entry_points: Iterable[Any] | None = None,
) -> Registry:
    """Import the configured plugin modules and the entry-point plugins; collect their handlers.

    Any problem (an import error, a handler that cannot take ``(event, db)``, a
    listed module with no handlers, a missing migrations folder) stops start-up
    with a message naming the plugin.
    """
    registry = Registry()
    for name in modules:
        where = f"plugin {name!r} (from plugins)"
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # any failure to import is the plugin's to name
            raise ConfigError(f"{where} failed to import: {exc!r}") from exc
        _add(registry, module, where)
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in entry_points:
        where = f"plugin {ep.name!r} (entry point {ep.value!r} in {ENTRY_POINT_GROUP})"
        _add(registry, _load_entry_point(ep, where), where)
    if migration_entry_points is None:
        migration_entry_points = importlib.metadata.entry_points(group=MIGRATIONS_GROUP)
    for ep in migration_entry_points:
        where = f"plugin {ep.name!r} (entry point {ep.value!r} in {MIGRATIONS_GROUP})"
        _add_migrations(registry, _load_entry_point(ep, where), where)
    return registry


def _load_entry_point(ep: Any, where: str) -> Any:
    try:
        return ep.load()
    except Exception as exc:  # any failure to import is the plugin's to name
        raise ConfigError(f"{where} failed to import: {exc!r}") from exc


def _add(registry: Registry, obj: Any, where: str) -> None:
    found = collect(obj)
    for registration in found:
        try:
            inspect.signature(registration.func).bind(None, None)
        except TypeError:
            raise ConfigError(
                f"{where}: handler {registration.name} must accept (event, db)"
            ) from None
        except ValueError:  # no signature to inspect (a builtin): let it be called
            pass
        registry.add_registration(registration)
    senders = collect_senders(obj)
    for found_sender in senders:
        try:
            inspect.signature(found_sender.func).bind(None)
        except TypeError:
            raise ConfigError(
                f"{where}: sender {found_sender.name} must accept (message)"
            ) from None
        except ValueError:  # no signature to inspect (a builtin): let it be called
            pass
        registry.add_sender(found_sender, where)
    reconcilers = collect_reconcilers(obj)
    for found_reconciler in reconcilers:
        try:
            inspect.signature(found_reconciler.func).bind(None)
        except TypeError:
            raise ConfigError(
                f"{where}: reconciler {found_reconciler.name} must accept (window)"
            ) from None
        except ValueError:  # no signature to inspect (a builtin): let it be called
            pass
        registry.add_reconciler(found_reconciler, where)
    module = obj if isinstance(obj, ModuleType) else None
    migrations = getattr(module, MIGRATIONS_ATTRIBUTE, None)
    if migrations is not None:
        _add_migrations(registry, migrations, where)
    blueprint = getattr(module, BLUEPRINT_ATTRIBUTE, None)
    if blueprint is not None:
        if not isinstance(blueprint, Blueprint):
            raise ConfigError(
                f"{where}: {BLUEPRINT_ATTRIBUTE} must be a flask.Blueprint, not "
                f"{type(blueprint).__name__}"
            )
        registry.add_blueprint(blueprint, where)
    if not found and not senders and not reconcilers and migrations is None and blueprint is None:
        raise ConfigError(
            f"{where} registers no handlers: decorate its functions with "
            "@handler(source, event_type), @sender(kind) or @reconciler(source) (from idemhook)"
        )


def register_blueprints(app: Flask, registry: Registry) -> None:
    """Serve the plugins' own routes (``IDEMHOOK_BLUEPRINT``) on ``app``.

    Called by ``create_app`` after idemhook's own routes and before the API sources'
    paths: a plugin route that another route already serves (the same rule and
    method), or a blueprint name already taken, stops start-up naming the plugin.
    """
    for blueprint, where in registry.blueprints:
        taken = {
            (rule.rule, method): rule.endpoint
            for rule in app.url_map.iter_rules()
            for method in rule.methods or ()
        }
        try:
            app.register_blueprint(blueprint)
        except ValueError as exc:  # Flask: the blueprint's name is already registered
            raise ConfigError(f"{where}: {BLUEPRINT_ATTRIBUTE}: {exc}") from None
        prefix = f"{blueprint.name}."
        for rule in app.url_map.iter_rules():
            if not rule.endpoint.startswith(prefix):
                continue
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                other = taken.get((rule.rule, method))
                if other is not None:
                    raise ConfigError(
                        f"{where}: {BLUEPRINT_ATTRIBUTE} route {method} {rule.rule} is already "
                        f"served by {other}"
                    )


def _add_migrations(registry: Registry, location: Any, where: str) -> None:
    """Add a plugin's revision folder: a path, or a package whose folder holds the revisions."""
    if isinstance(location, ModuleType):
        paths = list(getattr(location, "__path__", []))
        folder = Path(paths[0]) if paths else Path(location.__file__ or ".").parent
    elif isinstance(location, str | PathLike):
        folder = Path(location)
    else:
        raise ConfigError(f"{where}: migrations must be a folder path or a package")
    folder = folder.resolve()
    if not folder.is_dir():
        raise ConfigError(f"{where}: migrations folder {folder} does not exist")
    if folder not in registry.migrations:
        registry.migrations.append(folder)
