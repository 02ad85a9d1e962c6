"""The benchmark's API operation (an ``idempotency-key`` source): the webhook handler's UPDATE.

It answers as an API does, ``201`` with the account and a ``Location``, so that a
replay returns a stored status, body and header. The baseline answers the same.
"""

from __future__ import annotations

from typing import Any

from idemhook import Event, Response, handler

from .handler import _update


@handler("bench_api", "*")
def count_request(event: Event, db: Any) -> Response:
    """Count the request against its account (one row of 10,000) and answer 201."""
    account = int(event.payload["account"])
    db.execute(_update, {"event_id": event.id, "account": account})
    return Response(201, {"account": account}, {"Location": f"/v1/bench/{event.id}"})
