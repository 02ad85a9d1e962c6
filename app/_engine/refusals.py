"""Refused deliveries: the one place a refusal before the claim is logged and recorded.

The intake calls :meth:`Refusals.record` for every 4xx it answers before the claim
(:mod:`idemhook._web.intake`). Each refusal is one WARNING line on ``idemhook.refused``
(source, tenant, code, status, client address) and one statement into
``rejected_deliveries``, capped per source and minute (:mod:`idemhook._store.refusals`).
Recording never changes the answer: when the database cannot take the row, the line
says so and the sender still gets its 4xx.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from idemhook._engine.logs import log_fields
from idemhook._store.database import Database
from idemhook._store.refusals import record_rejection

log = logging.getLogger("idemhook.refused")

#: Default of IDEMHOOK_REJECTIONS_PER_MINUTE: rows per source and minute before the rest
#: are only counted (in the minute's last row).
DEFAULT_PER_MINUTE = 60


@dataclass(frozen=True, slots=True)
class Refusal:
    """What is kept of a refused delivery: never its body, never a secret header."""

    source: str
    tenant: str | None
    code: str
    status: int
    message: str
    received_at: datetime
    client_addr: str | None
    user_agent: str | None
    #: The body as read (None: refused before it was read, 413 and 415).
    body: bytes | None
    #: The request's headers without the secret-bearing ones (``safe_headers``).
    headers: dict[str, str]


Observer = Callable[[Refusal], None]


class Refusals:
    """Logs and records refusals (see the module docstring)."""

    def __init__(
        self, database: Database, per_minute: int, observers: Sequence[Observer] = ()
    ) -> None:
        self.database = database
        self.per_minute = per_minute
        #: Called after each refusal (metrics).
        self.observers = list(observers)

    def record(self, refusal: Refusal) -> None:
        fields: dict[str, Any] = {
            "source": refusal.source,
            "tenant": refusal.tenant,
            "code": refusal.code,
            "status": refusal.status,
            "client": refusal.client_addr,
        }
        body = refusal.body
        row = {
            "source": refusal.source,
            "tenant": refusal.tenant,
            "error": refusal.code,
            "status_code": refusal.status,
            "message": refusal.message,
            "received_at": refusal.received_at,
            "client_addr": refusal.client_addr,
            "user_agent": refusal.user_agent,
            "body_bytes": None if body is None else len(body),
            "body_sha256": None if body is None else hashlib.sha256(body).hexdigest(),
            "headers": refusal.headers,
        }
        try:
            record_rejection(self.database.lanes, self.database.engine, row, self.per_minute)
        except SQLAlchemyError as exc:
            # The sender still gets its 4xx: a refusal must never become a 500.
            fields["recorded"] = f"no ({type(exc).__name__})"
        log_fields(log, logging.WARNING, fields)
        for observer in self.observers:
            observer(refusal)
