"""A receiver under test: deliver signed events, then assert on what was stored."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import Row, text
from sqlalchemy.engine import URL
from werkzeug.test import TestResponse

from idemhook._engine.applier import apply_due
from idemhook._factory import create_app
from idemhook._store import migrate as migrations
from idemhook.testing.kit import deliver

#: Stands for "any value" in the ``assert_*`` helpers' optional arguments.
ANY: Any = object()


def build(
    url: URL, config: Mapping[str, Any] | str | Path, settings: dict, *, migrate: bool
) -> Flask:
    """Create the app on ``url`` from a sources file path or dict; optionally migrate it."""
    app = create_app(
        {"DATABASE_URL": url, "IDEMHOOK_CONFIG": _config(config), "TESTING": True, **settings}
    )
    if migrate:
        migrations.upgrade(app)
    return app


def _config(config: Mapping[str, Any] | str | Path) -> Mapping[str, Any] | str:
    return config if isinstance(config, Mapping) else str(config)


class Kit:
    """One receiver app on its own database, with delivery and row assertions."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client = app.test_client()
        self.runner = app.test_cli_runner()
        self.engine = app.extensions["idemhook.db"].engine
        self.url: URL = self.engine.url

    def deliver(
        self,
        source: str,
        payload: Any,
        headers: dict[str, str] | None = None,
        *,
        client: str | None = None,
        key: str | None = None,
        tenant: str | None = None,
    ) -> TestResponse:
        """POST ``payload`` (a dict/list, text or bytes) to ``source``, signed by its scheme.

        ``client`` and ``key`` (``idempotency-key`` sources): the client to sign as and the
        ``Idempotency-Key`` to send; the same key again is the client's retry. ``tenant``
        (a source with ``tenants = true``): post to ``/webhooks/<source>/<tenant>``, signed
        with the tenant's first live secret.
        """
        return deliver(
            self.client, source, payload, headers, as_client=client, key=key, tenant=tenant
        )

    def apply_received(self) -> int:
        """Apply the events asynchronous sources have received, as ``idemhook worker`` would.

        In this process, one batch after another until nothing is due (an event
        waiting for a backoff stays); returns how many attempts were made.
        """
        return apply_due(self.app)

    def sql(self, statement: str, **params: Any) -> list[Row]:
        """Run one SQL statement in its own transaction; return the rows (if any)."""
        with self.engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return result.all() if result.returns_rows else []

    def row(self, source: str, event_id: str) -> Row | None:
        """The ``processed_events`` row of ``(source, event_id)``, or None."""
        rows = self.sql(
            "SELECT * FROM processed_events WHERE source = :source AND event_id = :event_id",
            source=source,
            event_id=str(event_id),
        )
        return rows[0] if rows else None

    def failures(self, source: str, event_id: str) -> list[Row]:
        """The ``delivery_failures`` rows of ``(source, event_id)``, oldest first."""
        return self.sql(
            "SELECT * FROM delivery_failures WHERE source = :source AND event_id = :event_id "
            "ORDER BY id",
            source=source,
            event_id=str(event_id),
        )

    def _assert_row(
        self, source: str, event_id: str, status: str, result: Any, duplicates: int | None
    ) -> Row:
        row = self.row(source, event_id)
        assert row is not None, f"event {source}/{event_id} was not recorded"
        assert row.status == status, (
            f"event {source}/{event_id} is {row.status!r}, expected {status!r} "
            f"(result: {row.result!r})"
        )
        if result is not ANY:
            assert row.result == result, (
                f"event {source}/{event_id}: result {row.result!r}, expected {result!r}"
            )
        if duplicates is not None:
            assert row.duplicate_count == duplicates, (
                f"event {source}/{event_id} was seen again {row.duplicate_count} time(s), "
                f"expected {duplicates}"
            )
        return row

    def assert_processed(
        self, source: str, event_id: str, *, result: Any = ANY, duplicates: int | None = None
    ) -> Row:
        """Assert the event was applied (status ``processed``); return its row."""
        return self._assert_row(source, event_id, "processed", result, duplicates)

    def assert_ignored(
        self, source: str, event_id: str, *, reason: Any = ANY, duplicates: int | None = None
    ) -> Row:
        """Assert the event is recorded ``ignored`` (by ``Ignore(reason)``, or no handler)."""
        row = self._assert_row(source, event_id, "ignored", ANY, duplicates)
        if reason is not ANY:
            assert reason in _reasons(row.result, "ignored"), (
                f"event {source}/{event_id}: result {row.result!r}, expected reason {reason!r}"
            )
        return row

    def assert_rejected(
        self, source: str, event_id: str, *, reason: Any = ANY, duplicates: int | None = None
    ) -> Row:
        """Assert a handler rejected the event: ``rejected`` row plus a permanent failure."""
        expected = ANY if reason is ANY else {"rejected": reason}
        row = self._assert_row(source, event_id, "rejected", expected, duplicates)
        failures = self.failures(source, event_id)
        assert [f.permanent for f in failures] == [True], (
            f"event {source}/{event_id}: expected one permanent delivery_failures row, "
            f"found {[(f.error, f.permanent) for f in failures]}"
        )
        return row

    def assert_not_recorded(self, source: str, event_id: str) -> None:
        """Assert no claim exists (a crashed handler, or refused before the claim)."""
        row = self.row(source, event_id)
        assert row is None, f"event {source}/{event_id} is recorded as {row.status!r}"

    def close(self) -> None:
        self.engine.dispose()


def _reasons(result: Any, key: str) -> list[Any]:
    """Reasons in a result: ``{key: reason}``, or ``{handler: {key: reason}}`` for several."""
    if not isinstance(result, dict):
        return []
    if key in result:
        return [result[key]]
    return [v[key] for v in result.values() if isinstance(v, dict) and key in v]
