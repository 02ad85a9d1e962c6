"""The statuses of an outbox message (``outbox_messages.status``)."""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """Where an outbox message is: waiting (or in a worker's hands), delivered, or given up."""

    #: Not delivered yet: due at ``next_attempt_at``, or leased by the worker in ``leased_by``.
    PENDING = "pending"
    #: Its sender returned; ``result`` holds what it returned.
    SENT = "sent"
    #: Its sender raised on the last allowed attempt, or rejected it; ``last_error`` says why.
    DEAD = "dead"


MESSAGE_STATUSES = tuple(str(status) for status in MessageStatus)
