"""``processed_events`` read by the fault bracket: what committed, for a delivery's events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, select, tuple_

from ..models import processed_events


def results(engine: Engine, keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``{event_id: result}`` of the claims of ``keys`` ((source, event_id)) that committed."""
    table = processed_events
    with engine.connect() as conn:
        rows = conn.execute(
            select(table.c.event_id, table.c.result).where(
                tuple_(table.c.source, table.c.event_id).in_(list(keys))
            )
        ).all()
    return dict(rows)
