"""The one path that runs a delivery's handlers, wherever they run.

The live claim (:mod:`idemhook._engine.claim`), ``events replay`` (:mod:`idemhook._engine.replay`),
``failures retry`` (through the claim) and the test kit (through the
receiver) all end in :func:`run_handlers`, so the contract of docs/plugins.md
(the event, the session, ``Ignore``, ``Reject``, results and errors) cannot
drift between them. It returns what happened as a :class:`HandlerRun`; it
never commits, rolls back or records anything: that is its caller's
transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from idemhook._contract import (
    Event,
    HandlerChoice,
    HandlerOutcome,
    Ignore,
    Reject,
    Response,
    result_of,
)
from idemhook._engine import outbox
from idemhook._engine.registry import (
    Registration,
)
from idemhook._store.session import ClaimSession
from idemhook._values.jsontext import (
    dumps,
)
from idemhook._values.outcome import Status


@dataclass(frozen=True, slots=True)
class HandlerRun:
    """What a delivery's handlers did to one event.

    ``status`` is ``processed``, ``ignored``, ``rejected`` or ``failed``.
    ``result`` is what to store (``{"rejected": reason}`` for a rejection);
    ``stored`` its JSON text. ``handler`` names the handler that rejected or
    failed, ``error`` is what it raised (or the ``Reject`` it returned).
    """

    status: Status
    result: Any = None
    stored: str | None = None
    handler: str | None = None
    error: BaseException | None = None
    #: The :class:`~idemhook._contract.Response` a handler returned (the last one), else None.
    #: A class attribute here, a field of :class:`RespondedRun`: most runs return none.
    response: ClassVar[Response | None] = None

    @property
    def error_text(self) -> str:
        """The failure as recorded in ``delivery_failures.error``."""
        if self.status is Status.REJECTED:
            reason = self.error.reason if isinstance(self.error, Reject) else ""
            return f"{self.handler} rejected the event: {reason}"
        return f"{self.handler} raised {type(self.error).__name__}: {self.error}"

    @property
    def summary(self) -> str:
        """The failure as answered: handler and exception class, never the message."""
        return f"{self.handler} raised {type(self.error).__name__}"


@dataclass(frozen=True, slots=True)
class RespondedRun(HandlerRun):
    """A run in which a handler returned a :class:`~idemhook._engine.registry.Response`."""

    response: Response | None = None


def run_handlers(
    registrations: Sequence[Registration],
    event: Event,
    session: ClaimSession,
    *,
    senders: Mapping[str, Any] | None = None,
) -> HandlerRun:
    """Run ``registrations`` for ``event`` in ``session``'s transaction, in order.

    A handler's ``Reject`` (returned or raised) stops the run; an exception
    fails it. A returned ``Response`` contributes its body as the handler's
    result and is kept on the run (:class:`RespondedRun`). After the handlers,
    their ORM writes are flushed and the result is serialised, so a write
    PostgreSQL refuses or a result JSON cannot hold fails this event rather
    than the transaction's commit. ``event.outbox`` adds messages in
    ``session`` meanwhile; ``senders`` (the registry's) are the kinds it accepts.

    A stale event (``event.stale``, a source with ``freshness``) runs only the
    registrations made with ``stale=True``: every other handler never sees one.
    """
    if event.stale:
        registrations = stale_handlers(registrations)
    session.in_handler = True
    token = outbox.bind(event, session, senders)
    try:
        return _run(registrations, event, session)
    finally:
        outbox.unbind(token)
        session.in_handler = False


def stale_handlers(registrations: Sequence[Registration]) -> tuple[Registration, ...]:
    """The registrations that asked to see stale events too (``stale=True``)."""
    return tuple(r for r in registrations if r.stale)


def _run(registrations: Sequence[Registration], event: Event, session: ClaimSession) -> HandlerRun:
    results: dict[str, Any] = {}
    ignored = 0
    response: Response | None = None
    name = registrations[0].name if registrations else None
    try:
        for registration in registrations:
            name = registration.name
            try:
                value = registration.func(event, session)
            except HandlerOutcome as chosen:  # Ignore or Reject, raised from deep inside
                value = chosen
            if isinstance(value, HandlerChoice):  # one check for a plain result
                if isinstance(value, Reject):
                    return HandlerRun(Status.REJECTED, value.result(), handler=name, error=value)
                if isinstance(value, Ignore):
                    ignored += 1
                    value = value.result()
                else:
                    response = value  # type: ignore[assignment]  # the only other choice
                    value = response.body  # type: ignore[union-attr]
            results[name] = value
        result = result_of(results)
        stored = dumps(result, strict=True)
        if session.in_transaction():
            session.flush()
    except Exception as exc:  # anything a plugin raises fails this event, retryably
        return HandlerRun(Status.FAILED, handler=name, error=exc)
    status = Status.IGNORED if ignored == len(registrations) else Status.PROCESSED
    if response is None:
        return HandlerRun(status, result, stored)
    return RespondedRun(status, result, stored, response=response)
