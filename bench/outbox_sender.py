"""The outbox scenario's sender: does nothing but note when it was called (bench/outbox.py).

With ``BENCH_OUTBOX_LOG`` set, each call appends ``<key> <time.time()>`` to that file,
so the bench can measure commit-to-send latency; that is all it does.
"""

from __future__ import annotations

import os
import time
from typing import Any

from idemhook import Message, sender

_log: Any = None


@sender("bench", max_attempts=3)
def deliver(message: Message) -> None:
    global _log
    if _log is None:
        path = os.environ.get("BENCH_OUTBOX_LOG")
        _log = open(path, "a", buffering=1) if path else False  # noqa: SIM115 (kept open)
    if _log:
        _log.write(f"{message.key} {time.time()}\n")
