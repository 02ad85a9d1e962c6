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

from app import create_app as create_app
from app.operations import api_view as api_view
from app.outbox import Message as Message
from app.plugins import Event as Event
from app.plugins import Ignore as Ignore
from app.plugins import Reject as Reject
from app.plugins import Response as Response
from app.plugins import handler as handler
from app.plugins import sender as sender

try:
    __version__ = version("idemhook")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
