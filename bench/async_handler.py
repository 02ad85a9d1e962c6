"""The asynchronous source's handler: the bench's own one UPDATE (``bench/handler.py``).

A module of its own, so that the webhook configuration ``bench.instructions``
counts (``SOURCES_TOML``) stays the synchronous receiver's alone.
"""

from __future__ import annotations

from typing import Any

from idemhook import Event, handler

from .handler import count


@handler("bench_async", "*")
def count_async(event: Event, db: Any) -> dict[str, int]:
    """What the synchronous receiver's handler does, run by idemhook worker."""
    return count(event, db)
