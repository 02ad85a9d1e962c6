"""What happened to one event: the statuses, and the outcome the intake answers with."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """An event's status: in ``processed_events.status`` and in every answer."""

    #: New event: its handlers ran and committed with its claim.
    PROCESSED = "processed"
    #: New event with no matching handler, or whose handlers all returned ``Ignore``.
    IGNORED = "ignored"
    #: A handler returned or raised ``Reject``: recorded for good, effects rolled back.
    REJECTED = "rejected"
    #: Already applied: nothing ran (answers only, never stored).
    DUPLICATE = "duplicate"
    #: A handler raised, or its transaction could not commit (answered; stored only for an
    #: asynchronous event whose every allowed attempt failed).
    FAILED = "failed"
    #: An ``idempotency-key`` request whose operation is running now: its key is leased
    #: (``locked_until``) by the request that runs it (docs/idempotency-keys.md).
    IN_FLIGHT = "in_flight"
    #: Asynchronous source: claimed with its payload, waiting for ``idemhook worker``
    #: (stored, never answered: the answer says ``accepted``).
    RECEIVED = "received"
    #: Asynchronous source: recorded and left to the worker (answers only, never stored).
    ACCEPTED = "accepted"
    #: A source with ``freshness``: a newer version of the event's object was applied
    #: already (or this version, under another event ID); no handler ran, except those
    #: registered with ``stale=True`` (docs/configuration.md#freshness).
    STALE = "stale"


#: The statuses a claim row can hold (the table's check constraint).
STORED_STATUSES = (
    Status.PROCESSED,
    Status.IGNORED,
    Status.REJECTED,
    Status.IN_FLIGHT,
    Status.RECEIVED,
    Status.FAILED,
    Status.STALE,
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one event of a delivery."""

    event_id: str
    status: Status
    result: Any = None
    #: ``failed``: what went wrong, naming the handler and the exception's class
    #: (never the exception's message, which may hold payload data).
    error: str | None = None
    #: ``failed`` and ``rejected``: the handler at fault (``module:qualname``).
    handler: str | None = None
    #: ``failed``: the class of the exception.
    error_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"event_id": self.event_id, "status": str(self.status)}
        if self.status is Status.FAILED:
            body["error"] = self.error
        elif self.status is Status.ACCEPTED:
            pass  # nothing has run yet: no result
        elif self.status is Status.STALE:
            # The result names the applied event that made this one stale.
            body["newer"] = self.result.get("newer") if isinstance(self.result, dict) else None
            body["result"] = self.result
        else:
            body["result"] = self.result
        return body
