"""Freshness: object_versions, object_version_floors, and the status stale

A source with ``[sources.<name>.freshness]`` records, per object, the newest version
applied (``object_versions``, one row per ``(source, object_key)``); an event that is not
newer is claimed with status ``stale``. ``object_version_floors`` holds, per source, the
newest version ``idemhook objects prune`` deleted: events at or below it are stale.

PostgreSQL also gets ``idemhook_apply_version(source, object_key, version, event_id)``,
the check itself (app/_store/object_versions.py says why it is a function).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)
CONSTRAINT = "ck_processed_events_status"
OLD = ("processed", "ignored", "rejected", "in_flight", "received", "failed")
NEW = (*OLD, "stale")

#: Move the object's version to this event's if it is newer, by one upsert; NULL when it
#: did, else the applied event that is at least as new ('' if none is recorded). A row
#: this call inserted for an object that a concurrent `objects prune` deleted, after
#: raising the floor above it, is taken back (the floor commits before the deletion, so
#: the check after the insert sees it).
APPLY_VERSION = """
CREATE OR REPLACE FUNCTION idemhook_apply_version(
    p_source text, p_object_key text, p_version numeric, p_event_id text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    inserted boolean;
    newer text;
BEGIN
    INSERT INTO object_versions AS o (source, object_key, version, event_id, applied_at)
    SELECT p_source, p_object_key, p_version, p_event_id, now()
    WHERE NOT EXISTS (
        SELECT 1 FROM object_version_floors f
        WHERE f.source = p_source AND f.version >= p_version)
    ON CONFLICT (source, object_key) DO UPDATE
        SET version = excluded.version, event_id = excluded.event_id,
            applied_at = excluded.applied_at
        WHERE excluded.version > o.version
    RETURNING (o.xmax = 0) INTO inserted;
    IF FOUND THEN
        IF NOT inserted OR NOT EXISTS (
            SELECT 1 FROM object_version_floors f
            WHERE f.source = p_source AND f.version >= p_version) THEN
            RETURN NULL;
        END IF;
        DELETE FROM object_versions WHERE source = p_source AND object_key = p_object_key;
    END IF;
    SELECT coalesce(
        (SELECT o.event_id FROM object_versions o
         WHERE o.source = p_source AND o.object_key = p_object_key AND o.version >= p_version),
        (SELECT f.event_id FROM object_version_floors f
         WHERE f.source = p_source AND f.version >= p_version))
    INTO newer;
    RETURN coalesce(newer, '');
END
$$
"""


def _replace_check(statuses: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        # SQLite cannot ALTER a CHECK in place: batch mode rebuilds the table (the demo's).
        with op.batch_alter_table("processed_events") as batch:
            batch.drop_constraint(op.f(CONSTRAINT), type_="check")
            batch.create_check_constraint(op.f(CONSTRAINT), f"status IN {statuses!r}")
        return
    # NOT VALID, then VALIDATE after the commit: the table is locked only for the catalog
    # change; the scan that checks existing rows runs under a lock deliveries go on beside.
    op.execute(f"ALTER TABLE processed_events DROP CONSTRAINT {CONSTRAINT}")
    op.execute(
        f"ALTER TABLE processed_events ADD CONSTRAINT {CONSTRAINT} "
        f"CHECK (status IN {statuses!r}) NOT VALID"
    )
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE processed_events VALIDATE CONSTRAINT {CONSTRAINT}")


def upgrade() -> None:
    # No index beside the primary key: an applied event rewrites its object's row, and
    # with no other index on it PostgreSQL can do that in place (a HOT update).
    # `objects prune` walks the primary key instead.
    op.create_table(
        "object_versions",
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("object_key", sa.String(255), nullable=False),
        sa.Column("version", sa.Numeric(), nullable=False),
        sa.Column("event_id", sa.String(320), nullable=False),
        sa.Column("applied_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("source", "object_key", name="pk_object_versions"),
    )
    op.create_table(
        "object_version_floors",
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("version", sa.Numeric(), nullable=False),
        sa.Column("event_id", sa.String(320), nullable=False),
        sa.Column("pruned_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("source", name="pk_object_version_floors"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Every applied event updates its object's row: leave room on each page for the
        # new row version, so that the update stays on the page (HOT) and touches no index.
        op.execute("ALTER TABLE object_versions SET (fillfactor = 80)")
        op.execute(APPLY_VERSION)
    _replace_check(NEW)


def downgrade() -> None:
    # Fails (the CHECK is violated) while stale events exist: delete them first.
    _replace_check(OLD)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION idemhook_apply_version(text, text, numeric, text)")
    op.drop_table("object_version_floors")
    op.drop_table("object_versions")
