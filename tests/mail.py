"""A real SMTP server for the outbox tests (aiosmtpd), which can hold a DATA reply or be down.

    with SmtpServer() as smtp:                # listens on 127.0.0.1:smtp.port
        ...
        smtp.wait_for(1)                      # until one email has been accepted
        smtp.message_ids()                    # the Message-ID of each email, in order

``hold()`` makes the next DATA command wait (the email arrived, the server has not
answered) until ``release()``; ``stop()`` and ``start()`` take the server down and
bring it back on the same port.
"""

from __future__ import annotations

import asyncio
import email
import threading
import time
from dataclasses import dataclass

from aiosmtpd.controller import Controller

from tests.servers import free_port

#: Guard against a hung test; never a performance assertion.
GUARD_SECONDS = 60.0


@dataclass(frozen=True)
class Received:
    """One email the server accepted (or, when held, received and not yet answered)."""

    message_id: str
    to: tuple[str, ...]
    subject: str
    text: str


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_DATA(self, _server, _session, envelope) -> str:  # noqa: N802 (aiosmtpd)
        parsed = email.message_from_bytes(envelope.content)
        body = parsed.get_payload(decode=True) or b""
        received = Received(
            str(parsed["Message-ID"]),
            tuple(envelope.rcpt_tos),
            str(parsed["Subject"]),
            body.decode(errors="replace").strip(),
        )
        gate = self.server._take_gate()
        with self.server._lock:
            self.server.arrived.append(received)
        if gate is not None:
            gate.arrived.set()
            await asyncio.get_running_loop().run_in_executor(None, gate.release.wait)
        with self.server._lock:
            self.server.accepted.append(received)
        return "250 2.0.0 queued as " + received.message_id.strip("<>")[:16]


@dataclass
class _Gate:
    arrived: threading.Event
    release: threading.Event


class SmtpServer:
    """aiosmtpd on 127.0.0.1, in a thread of the test process."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        #: Every email whose DATA arrived (held or not), and those answered 250.
        self.arrived: list[Received] = []
        self.accepted: list[Received] = []
        self._lock = threading.Lock()
        self._gate: _Gate | None = None
        self._gates: list[_Gate] = []
        self._controller: Controller | None = None

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        for gate in self._gates:
            gate.release.set()
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def hold(self) -> _Gate:
        """Make the next DATA wait for ``release()``; returns the gate (``.arrived`` is set
        when the held email is in)."""
        gate = _Gate(threading.Event(), threading.Event())
        self._gate = gate
        self._gates.append(gate)
        return gate

    def release(self) -> None:
        for gate in self._gates:
            gate.release.set()

    def _take_gate(self) -> _Gate | None:
        with self._lock:
            gate, self._gate = self._gate, None
            return gate

    def message_ids(self, *, accepted: bool = True) -> list[str]:
        with self._lock:
            return [r.message_id for r in (self.accepted if accepted else self.arrived)]

    def wait_for(self, count: int, *, timeout: float = GUARD_SECONDS) -> list[Received]:
        """Wait until at least ``count`` emails were accepted; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.accepted) >= count:
                    return list(self.accepted)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the SMTP server accepted {len(self.accepted)} emails, not {count}"
                )
            time.sleep(0.01)  # polling, bounded by the deadline
