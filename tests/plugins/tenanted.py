"""A handler that says which tenant an event came from, and where it ran.

For sources ``shop`` (sync) and ``shop_async`` (``mode = "async"``), every event's
result is ``{"tenant": event.tenant, "id": event.id, "worker": <the process's pid>}``;
``{"fail": true}`` in the payload makes it raise.
"""

from __future__ import annotations

import os

from idemhook import handler


@handler("shop", "*")
@handler("shop_async", "*")
def seen(event, db):
    if event.payload.get("fail"):
        raise RuntimeError("asked to fail")
    return {"tenant": event.tenant, "id": event.id, "worker": os.getpid()}
