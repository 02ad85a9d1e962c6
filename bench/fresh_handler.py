"""The freshness scenario's handler: the bench's own one UPDATE (``bench/handler.py``).

A module of its own, so that the webhook configuration ``bench.instructions`` counts
(``SOURCES_TOML``) stays the plain receiver's alone; ``bench_fresh`` is the same source
as ``bench`` with ``[sources.bench_fresh.freshness]`` set (docs/configuration.md).
"""

from __future__ import annotations

from typing import Any

from idemhook import Event, handler

from .handler import DATABASE_ONLY, count


@handler("bench_fresh", "*", database_only=DATABASE_ONLY)
def count_fresh(event: Event, db: Any) -> dict[str, int]:
    """What the plain source's handler does, behind the freshness check."""
    return count(event, db)
