"""idemhook's public API: everything a plugin author imports.

    from idemhook import handler, Ignore, Reject, Response, Event
    from idemhook import sender, Message          # the outbox (docs/outbox.md)
    from idemhook import api_view                 # an API's own routes (docs/plugins.md)

``idemhook.testing`` holds the test kit (``Kit``, ``deliver``, ``signed``, ``ANY``)
and, through its pytest plugin, the ``idemhook`` fixture. The service itself
lives in the ``app`` package; only the names here are the documented contract
(docs/plugins.md). Each name is re-exported on its own line (``X as X``), so
adding one is one line.
"""

from importlib.metadata import PackageNotFoundError, version

from idemhook import create_app as create_app
from idemhook._web.operations import api_view as api_view
from idemhook._engine.outbox import Message as Message
from idemhook._engine.registry import Event as Event
from idemhook._engine.registry import Ignore as Ignore
from idemhook._engine.registry import Reject as Reject
from idemhook._engine.registry import Response as Response
from idemhook._engine.registry import handler as handler
from idemhook._engine.registry import sender as sender

try:
    __version__ = version("idemhook")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
