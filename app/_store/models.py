"""The tables users query: ``processed_events``, ``delivery_failures``, ``outbox_messages``,
``reconcile_runs`` (and ``event_queue``, asynchronous sources' events waiting for the worker).
``object_versions`` (and ``event_queue``, asynchronous sources' events waiting for the
worker; ``object_version_floors``, what pruning ``object_versions`` left behind).

Column names are a public contract (``docs/querying.md`` explains each one).
The schema itself is created by the Alembic revisions in ``migrations/``; these
declarations are what the code and ``target_metadata`` see.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from idemhook._values.outbox_status import MESSAGE_STATUSES
from idemhook._values.outcome import STORED_STATUSES

# Stable constraint names that migrations can refer to (Alembic's naming docs).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: JSON everywhere, JSONB on PostgreSQL so that analysts can index and query it.
JSONType = JSON().with_variant(JSONB(), "postgresql")
#: BIGINT identity on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")
Timestamp = DateTime(timezone=True)
#: A version (app.freshness): exact on PostgreSQL; the demo's SQLite hands back numbers.
VersionNumber = Numeric().with_variant(Numeric(asdecimal=False), "sqlite")

EVENT_STATUSES = tuple(str(status) for status in STORED_STATUSES)
#: ``processed_events.received_via``: a live delivery, or an event a reconcile run recovered.
RECEIVED_VIA = ("delivery", "reconcile")
#: ``reconcile_runs.outcome``: still running, or how the run ended (docs/reconcile.md).
RUN_OUTCOMES = ("running", "succeeded", "refused", "failed", "interrupted", "abandoned")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


#: Longest stored event ID: a provider's is at most 255 characters; an ``idempotency-key``
#: source's named client stores ``<client>:<key>`` (64 + 1 + 255).
EVENT_ID_LENGTH = 320


class ProcessedEvent(Base):
    """One row per ``(source, event_id)`` ever claimed: the dedupe memory."""

    __tablename__ = "processed_events"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_LENGTH))
    event_type: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(Timestamp)
    processed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    payload: Mapped[Any | None] = mapped_column(JSONType)
    #: The delivery's headers without those that carry secrets (replays see these).
    headers: Mapped[Any | None] = mapped_column(JSONType)
    result: Mapped[Any | None] = mapped_column(JSONType)
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_seen_at: Mapped[datetime] = mapped_column(Timestamp)
    replayed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    replay_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The columns of idempotency-key sources (docs/idempotency-keys.md); null for webhooks.
    #: The API client whose key this is (a name under ``clients``); null: the only one.
    client: Mapped[str | None] = mapped_column(String(64))
    #: ``sha256:<hex>`` of the request's method, path, Content-Type and body.
    fingerprint: Mapped[str | None] = mapped_column(String(71))
    #: The operation's answer: status and headers; its body is ``result``.
    response_status: Mapped[int | None] = mapped_column(SmallInteger)
    response_headers: Mapped[Any | None] = mapped_column(JSONType)
    #: When the key becomes new again (claimed + ``key_ttl``).
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: While ``in_flight``: the lease of the request that runs it, and its owner.
    locked_until: Mapped[datetime | None] = mapped_column(Timestamp)
    lock_owner: Mapped[str | None] = mapped_column(String(32))
    #: Asynchronous sources (docs/async.md): the worker's failed attempts so far, and
    #: the event's order key (the value at the source's ``order_key``).
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    order_key: Mapped[str | None] = mapped_column(String(255))
    #: Asynchronous sources: workers that ended (killed, crashed) while they held the event.
    interruptions: Mapped[int] = mapped_column(Integer, server_default="0")
    #: How the event reached idemhook: ``delivery`` (the provider posted it) or
    #: ``reconcile`` (found in the provider's own log by ``idemhook reconcile``, docs/reconcile.md).
    received_via: Mapped[str] = mapped_column(String(16), server_default=RECEIVED_VIA[0])
    #: The tenant that sent the event (``POST /webhooks/<source>/<tenant>``; its
    #: ``event_id`` is then ``<tenant>:<id>``); null for a source's own endpoint.
    tenant: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint("source", "event_id"),
        CheckConstraint(f"status IN {EVENT_STATUSES!r}", name="status"),
        # "Recent events of a source (and type)" and "events per type per hour".
        Index(None, "source", "event_type", "received_at"),
        # Pruning, "everything since T" and keyset pages ordered by (received_at, id).
        Index(None, "received_at", "id"),
        # The dashboard's status filters and counts (migration 0006): only the rows that
        # are not "processed", so a processed event's insert maintains no extra index.
        Index(
            "ix_processed_events_not_processed",
            "status",
            "received_at",
            "id",
            postgresql_where=text("status <> 'processed'"),
            postgresql_include=["source"],
            sqlite_where=text("status <> 'processed'"),
        ),
    )


class DeliveryFailure(Base):
    """One row per failed attempt to apply an event; written outside the failed transaction."""

    __tablename__ = "delivery_failures"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_LENGTH))
    event_type: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    raw_body: Mapped[bytes] = mapped_column(LargeBinary)
    payload: Mapped[Any | None] = mapped_column(JSONType)
    headers: Mapped[Any | None] = mapped_column(JSONType)
    permanent: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    failed_at: Mapped[datetime] = mapped_column(Timestamp)
    #: The event's tenant, as in ``processed_events``; null for a source's own endpoint.
    tenant: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index(None, "source", "event_id"),
        Index(None, "failed_at", "id"),
    )


processed_events = ProcessedEvent.__table__
delivery_failures = DeliveryFailure.__table__


class QueuedEvent(Base):
    """An asynchronous source's event waiting for ``idemhook worker`` (docs/async.md).

    One row per ``processed_events`` row with status ``received`` (same ``id``),
    inserted with it by the claim and deleted in the transaction that records the
    event's outcome. A worker holds the row's lock (``FOR UPDATE SKIP LOCKED``)
    while the event's handlers run; the event's own row stays unlocked, so a
    duplicate delivery is counted and answered without waiting for the handlers.
    """

    __tablename__ = "event_queue"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=False)
    source: Mapped[str] = mapped_column(String(64))
    order_key: Mapped[str | None] = mapped_column(String(255))
    #: When the event is due: its receipt, or the end of a backoff after a failure.
    next_attempt_at: Mapped[datetime] = mapped_column(Timestamp)
    received_at: Mapped[datetime] = mapped_column(Timestamp)

    __table_args__ = (
        # The worker's scan: what is due, oldest first.
        Index("ix_event_queue_due", "next_attempt_at", "id"),
        # The worker's probe: an earlier waiting event of the same source and order key.
        Index(
            "ix_event_queue_order",
            "source",
            "order_key",
            "id",
            postgresql_where=text("order_key IS NOT NULL"),
            sqlite_where=text("order_key IS NOT NULL"),
        ),
    )


event_queue = QueuedEvent.__table__


class OutboxMessage(Base):
    """One side effect to deliver outside the database, added in a claim's transaction.

    It exists if and only if that transaction committed; ``idemhook worker``
    hands it to the sender of its ``kind`` until it is ``sent`` or ``dead``
    (docs/outbox.md). ``leased_by`` names the worker holding it until
    ``next_attempt_at`` (its lease), after which another worker may take it.
    """

    __tablename__ = "outbox_messages"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(512))
    payload: Mapped[Any | None] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(Timestamp)
    leased_by: Mapped[str | None] = mapped_column(String(128))
    last_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[Any | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: The event whose handler added it (none when added outside a handler).
    source: Mapped[str | None] = mapped_column(String(64))
    event_id: Mapped[str | None] = mapped_column(String(EVENT_ID_LENGTH))

    __table_args__ = (
        UniqueConstraint("kind", "key"),
        CheckConstraint(f"status IN {MESSAGE_STATUSES!r}", name="status"),
        # The worker's claim: due pending messages, oldest first (a small, hot index).
        Index(
            "ix_outbox_messages_due",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # Listings, keyset pages ordered by (created_at, id), and pruning.
        Index(None, "created_at", "id"),
        # The dead messages, newest first, and their count (migration 0008): a message
        # enters it only when it goes dead, so adding and sending maintain no extra index.
        Index(
            "ix_outbox_messages_dead",
            "created_at",
            "id",
            postgresql_where=text("status = 'dead'"),
            sqlite_where=text("status = 'dead'"),
        ),
        Index(None, "source", "event_id"),
    )


outbox_messages = OutboxMessage.__table__


class ReconcileRun(Base):
    """One run of a source's reconciler: what it looked at, found and applied (docs/reconcile.md).

    A row is the run's fence too: at most one unfinished run per source (a partial unique
    index), and one run per scheduled slot of ``every`` (``scheduled_for``); a run whose
    holder stopped renewing ``lease_until`` is taken over as ``abandoned``.
    """

    __tablename__ = "reconcile_runs"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    #: ``worker`` (scheduled by ``every``) or ``command`` (``idemhook reconcile``).
    started_by: Mapped[str] = mapped_column(String(16))
    #: A worker's run: the start of the ``every`` slot it runs for (one run per slot).
    scheduled_for: Mapped[datetime | None] = mapped_column(Timestamp)
    #: The window asked of the provider: events from ``window_start`` to ``window_end``.
    window_start: Mapped[datetime] = mapped_column(Timestamp)
    window_end: Mapped[datetime] = mapped_column(Timestamp)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    outcome: Mapped[str] = mapped_column(String(16))
    #: The process running it (``host:pid``), and until when its claim holds unrenewed.
    owner: Mapped[str] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    #: Events the provider listed in the window, those already applied, those applied by
    #: this run (the provider never got them through), and those that failed to apply.
    seen: Mapped[int] = mapped_column(Integer, server_default="0")
    already: Mapped[int] = mapped_column(Integer, server_default="0")
    recovered: Mapped[int] = mapped_column(Integer, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, server_default="0")
    #: Why the run did not succeed (the provider refused the key, failed, rate-limited it).
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("source", "scheduled_for"),
        CheckConstraint(f"outcome IN {RUN_OUTCOMES!r}", name="outcome"),
        # The fence: one unfinished run per source.
        Index(
            "uq_reconcile_runs_running",
            "source",
            unique=True,
            postgresql_where=text("finished_at IS NULL"),
            sqlite_where=text("finished_at IS NULL"),
        ),
        # History per source, newest first; the last run and the last day's runs.
        Index(None, "source", "started_at", "id"),
    )


reconcile_runs = ReconcileRun.__table__


class ObjectVersion(Base):
    """The newest version applied to each object of a source with ``freshness``.

    One row per ``(source, object_key)``, written in the transaction of the event that
    applied it, by one statement that changes the row only when the event's version is
    larger (docs/configuration.md#freshness). ``version`` is the normalised value: the
    number itself, or an RFC 3339 time as seconds since 1970-01-01T00:00:00Z, with every
    fractional digit that was given.
    """

    __tablename__ = "object_versions"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    object_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[Any] = mapped_column(VersionNumber, nullable=False)
    #: The event whose version this is (its row in ``processed_events``).
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_LENGTH))
    applied_at: Mapped[datetime] = mapped_column(Timestamp)


class ObjectVersionFloor(Base):
    """Per source, the newest version ``idemhook objects prune`` has deleted.

    An event whose version is at or below its source's floor is stale whatever its
    object, so that pruning ``object_versions`` never lets an old event apply.
    """

    __tablename__ = "object_version_floors"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[Any] = mapped_column(VersionNumber, nullable=False)
    #: The pruned event that set the floor (what a stale answer names as newer).
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_LENGTH))
    pruned_at: Mapped[datetime] = mapped_column(Timestamp)


object_versions = ObjectVersion.__table__
object_version_floors = ObjectVersionFloor.__table__


class SourceSecret(Base):
    """One secret of one tenant of a source with ``tenants = true`` (docs/configuration.md).

    ``secret`` is the Fernet token of the secret (:mod:`idemhook._config.secrets`), never the
    secret itself. A delivery to ``/webhooks/<source>/<tenant>`` is verified against the
    tenant's live rows (``expires_at`` null or later than now).
    """

    __tablename__ = "source_secrets"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(64))
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: When a delivery last verified with this secret, and how many did (flushed about
    #: once a second by each process that verified them).
    last_matched_at: Mapped[datetime | None] = mapped_column(Timestamp)
    matched_count: Mapped[int] = mapped_column(BigInteger, server_default="0")

    __table_args__ = (
        # The delivery's lookup: a tenant's secrets.
        Index(None, "source", "tenant"),
    )


class SecretMatch(Base):
    """How often, and when last, each static secret of a source verified a delivery.

    ``secret`` is the secret's position in the source's ``secret`` list (``1`` for a
    single secret; ``<client>:<position>`` for a named client of an ``idempotency-key``
    source), never its value.
    """

    __tablename__ = "secret_matches"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(80), primary_key=True)
    last_matched_at: Mapped[datetime] = mapped_column(Timestamp)
    matched_count: Mapped[int] = mapped_column(BigInteger, server_default="0")


source_secrets = SourceSecret.__table__
secret_matches = SecretMatch.__table__


class RejectedDelivery(Base):
    """A delivery refused before its claim (401, 403, 400, 404 tenant, 413, 415).

    Never the body, never a secret-bearing header. At most
    ``IDEMHOOK_REJECTIONS_PER_MINUTE`` rows per source and minute (``slot`` 1 to N), and
    one more, slot N + 1, whose ``count`` holds every refusal past them: a flood of
    forged requests cannot fill the disk (:mod:`idemhook._store.refusals`).
    """

    __tablename__ = "rejected_deliveries"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    #: The tenant named in the URL (``/webhooks/<source>/<tenant>``), else NULL.
    tenant: Mapped[str | None] = mapped_column(String(255))
    #: The answer's stable ``error`` code (``invalid_signature``, ``payload_too_large``).
    error: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(SmallInteger)
    #: The refusal's own text, as the sender was answered.
    message: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(Timestamp)
    #: ``received_at`` to the minute, and the row's place in that minute (the cap's key).
    minute: Mapped[datetime] = mapped_column(Timestamp)
    slot: Mapped[int] = mapped_column(Integer)
    #: Refusals this row stands for: 1, or in the minute's last slot all past the cap.
    count: Mapped[int] = mapped_column(Integer, server_default="1")
    #: The client's address after IDEMHOOK_TRUSTED_PROXIES (ProxyFix).
    client_addr: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(Text)
    body_bytes: Mapped[int | None] = mapped_column(BigInteger)
    #: Hex SHA-256 of the body read (NULL when it was refused before being read: 413, 415).
    body_sha256: Mapped[str | None] = mapped_column(String(64))
    #: The request's headers without those that may carry a secret (``safe_headers``).
    headers: Mapped[Any | None] = mapped_column(JSONType)

    __table_args__ = (
        UniqueConstraint("source", "minute", "slot"),
        Index(None, "received_at"),
    )


class SourcePause(Base):
    """A paused source: its deliveries are recorded ``received``, applied after resume."""

    __tablename__ = "source_pauses"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(Timestamp)
    paused_by: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)


rejected_deliveries = RejectedDelivery.__table__
source_pauses = SourcePause.__table__
