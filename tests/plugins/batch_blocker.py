"""The blocking handler (:mod:`tests.plugins.blocker`) for a batch source, ``blocking_batch``,
counting its runs where no rollback reaches: each run first appends the event's ID to the
file its payload names (``runs``), then does what the blocking handler does."""

from __future__ import annotations

from pathlib import Path

from idemhook import handler
from tests.plugins.blocker import block


@handler("blocking_batch", "*")
def block_counting_runs(event, db):
    with Path(event.payload["runs"]).open("a") as runs:
        runs.write(f"{event.id}\n")
    return block(event, db)
