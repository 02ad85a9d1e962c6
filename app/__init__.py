"""idemhook: a webhook receiver that makes provider retries harmless.

The public API, everything a plugin author imports (docs/plugins.md)::

    from idemhook import handler, Ignore, Reject, Response, Event
    from idemhook import sender, Message          # the outbox (docs/outbox.md)
    from idemhook import api_view                 # an API's own routes (docs/plugins.md)
    from idemhook import reconciler, Window       # events from a provider's log (docs/reconcile.md)

``idemhook.testing`` holds the test kit (``Kit``, ``deliver``, ``signed``, ``ANY``)
and, through its pytest plugin, the ``idemhook`` fixture. Every other module is
internal and private by name (``idemhook._engine``, ``idemhook._store``, ...).

``create_app()`` is the only entry point: gunicorn serves ``idemhook:create_app()``,
the ``idemhook`` CLI builds the app the same way. Nothing connects to a database
or reads the environment at import time.

The repository keeps this package in ``app/`` (setuptools' ``package-dir`` maps it to
``idemhook``, see pyproject.toml).
"""

from importlib.metadata import PackageNotFoundError, version

from idemhook._contract import Event, Ignore, Message, Reject, Response, Window
from idemhook._engine.registry import handler, reconciler, sender
from idemhook._factory import create_app
from idemhook._web.operations import api_view

__all__ = [
    "Event",
    "Ignore",
    "Message",
    "Reject",
    "Response",
    "Window",
    "api_view",
    "create_app",
    "handler",
    "reconciler",
    "sender",
]

try:
    __version__ = version("idemhook")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
