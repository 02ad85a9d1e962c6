"""A plugin's ``@reconciler(source)``: for providers without an event log of their own.

The function is given the run's :class:`~idemhook.Window` and yields the payloads of
the events of that time, each as the source would have received it in a delivery's
body (docs/reconcile.md#your-own-reconciler). Their IDs are read by the source's own
``event_id``, so a synthesized ID must equal the live one, or the same change would be
applied twice.
"""

from __future__ import annotations

from collections.abc import Iterator

from idemhook._contract import (
    Window,
)
from idemhook._engine.reconcile.base import Found
from idemhook._engine.reconcile.http import ProviderError
from idemhook._engine.registry import Reconciler as Registered

PAGE_SIZE = 100


class PluginReconciler:
    """Pages of what a plugin's reconciler yields."""

    def __init__(self, registered: Registered) -> None:
        self.registered = registered

    def pages(self, window: Window) -> Iterator[list[Found]]:
        page: list[Found] = []
        try:
            for payload in self.registered.func(window):
                page.append(Found(payload))
                if len(page) == PAGE_SIZE:
                    yield page
                    page = []
        except ProviderError:
            raise
        except Exception as exc:  # anything the plugin raises ends the run, named
            raise ProviderError(
                f"reconciler {self.registered.name} raised {type(exc).__name__}: {exc}"
            ) from exc
        if page:
            yield page

    def close(self) -> None:
        pass
