"""An ORM class on the test suite's ``test_effects`` table, for handlers that use ``db.add``."""

from __future__ import annotations

from sqlalchemy import Column, MetaData, String, Table
from sqlalchemy.orm import registry


def mapped_effect() -> type:
    """A fresh class ``Effect(source, event_id)`` mapped to ``test_effects``."""
    effects = Table(
        "test_effects",
        MetaData(),
        Column("source", String(64), primary_key=True),
        Column("event_id", String(255), primary_key=True),
    )

    class Effect:
        def __init__(self, source: str, event_id: str) -> None:
            self.source, self.event_id = source, event_id

    registry().map_imperatively(Effect, effects)
    return Effect
