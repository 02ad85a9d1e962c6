"""Senders that leave a trace outside the database, for the worker fault tests.

Every send (or handler run) appends one JSON line to ``trace.jsonl`` in the directory named by the
environment variable :data:`TRACE_ENV` (a test's ``tmp_path``): which kind of call
(``send`` or ``run``), the message or event, its attempt and the worker's pid. The
file is written with one ``O_APPEND`` write per line, outside any transaction, so
it holds every call, including those whose transaction was rolled back, whose result
was never recorded, or whose worker was killed a moment later. Tests read it back with
:func:`calls`.

Some calls *hold*: they write their line (the test's exact signal that the send is
running) and then wait until the test creates ``release-<key>`` (or ``release-all``)
in the same directory, as a slow provider would keep the worker waiting. A hold
gives up after :data:`HOLD_GUARD_SECONDS` (a guard against a hung test, raising).

Senders (kinds):

- ``held``: holds every send, then returns ``{"sent": key}``;
- ``quick``: returns at once (an enqueue); ``lease_seconds=2``;
- ``slow``: holds every send, then returns;
- ``fragile``: holds when the payload says ``{"hang": true}`` (the test kills the
  worker meanwhile), else returns at once. Its retry policy comes from the test's
  ``[outbox.fragile]`` table.

The handler of ``tests.plugins.session_ender`` traces its runs here too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from idemhook import Message, sender

TRACE_ENV = "IDEMHOOK_TEST_TRACE_DIR"
TRACE_FILE = "trace.jsonl"
HOLD_GUARD_SECONDS = 120.0


def _directory() -> Path:
    return Path(os.environ[TRACE_ENV])


def trace(call: str, **fields: Any) -> None:
    """Append one line for this call (one write: lines of concurrent workers never mix)."""
    line = json.dumps({"call": call, "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(_directory() / TRACE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def calls(directory: Path, call: str = "send", **match: Any) -> list[dict[str, Any]]:
    """The traced calls of type ``call`` whose fields equal ``match``, in the order made."""
    path = directory / TRACE_FILE
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [
        c for c in found if c["call"] == call and all(c.get(k) == v for k, v in match.items())
    ]


def release(directory: Path, key: str = "all") -> None:
    """Let the held call(s) for ``key`` (every one: ``all``) return."""
    (directory / f"release-{key}").touch()


def _hold(key: str) -> None:
    directory = _directory()
    deadline = time.monotonic() + HOLD_GUARD_SECONDS
    while not ((directory / f"release-{key}").exists() or (directory / "release-all").exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test never released {key}")
        time.sleep(0.01)  # a provider taking its time; bounded by the guard


def _sent(message: Message) -> None:
    trace("send", kind=message.kind, key=message.key, id=message.id, attempt=message.attempts)


@sender("held", lease_seconds=3)
def send_held(message: Message) -> dict[str, str]:
    _sent(message)
    _hold(message.key)
    return {"sent": message.key}


@sender("quick", lease_seconds=2)
def send_quick(message: Message) -> dict[str, str]:
    _sent(message)
    return {"sent": message.key}


@sender("slow")
def send_slow(message: Message) -> dict[str, str]:
    _sent(message)
    _hold(message.key)
    return {"sent": message.key}


@sender("fragile")
def send_fragile(message: Message) -> dict[str, str]:
    _sent(message)
    if (message.payload or {}).get("hang"):
        _hold(message.key)
    return {"sent": message.key}
