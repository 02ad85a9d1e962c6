"""What the worker's kinds of work tell about each attempt, as interfaces.

The Prometheus instruments that implement them live with the metrics endpoint
(:mod:`idemhook._web.metrics`), a layer above: the engine depends on these shapes only.
"""

from __future__ import annotations

from typing import Protocol

from idemhook._contract import Event


class AppliedObserver(Protocol):
    """Told of each attempt of ``idemhook worker`` at a received event."""

    def observe_applied(self, event: Event, outcome: str, seconds: float | None) -> None: ...

    def observe_delay(self, source: str, seconds: float) -> None: ...


class DeliveryObserver(Protocol):
    """Told of each attempt at an outbox message."""

    def observe_delivery(self, kind: str, outcome: str, seconds: float) -> None: ...
