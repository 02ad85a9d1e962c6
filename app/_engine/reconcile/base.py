"""What a reconciler is: given a window of time, the pages of events a provider logged.

A :class:`Found` is one logged event with as much as its listing tells: the payload
when the list holds it (Stripe's events list, a plugin's reconciler), or only the
headers a delivery would carry (GitHub's deliveries list: the delivery GUID and the
event), with ``load`` to fetch the rest. The run reads the event ID from what is known,
exactly as the live source reads it, and loads only the events it has no claim of.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from idemhook._contract import (
    Window,
)


class Unusable(Exception):
    """This one event cannot be recovered (its log entry lacks what a delivery holds)."""


@dataclass(frozen=True, slots=True)
class Found:
    """One event of a provider's log."""

    #: The event as a delivery's body holds it; None until ``load`` fetches it.
    payload: Any
    #: The headers a delivery of it carries (those the listing tells).
    headers: dict[str, str] = field(default_factory=dict)
    #: Fetch ``(payload, headers)`` when the listing does not hold them; raises
    #: :class:`Unusable` for an entry that cannot be recovered.
    load: Callable[[], tuple[Any, dict[str, str]]] | None = None


class Reconciler(Protocol):
    """Lists a provider's events of a window, a page at a time."""

    def pages(self, window: Window) -> Iterator[list[Found]]:
        """The events of ``window``, newest first or in any order, a page at a time.

        Raises :class:`app.reconcile.http.ProviderError` when the provider refuses or fails.
        """
        ...

    def close(self) -> None:
        """Let go of connections."""
        ...
