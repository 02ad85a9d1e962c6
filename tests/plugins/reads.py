"""A plugin's own routes for the test APIs (``IDEMHOOK_BLUEPRINT`` with ``@api_view``).

``GET /v1/charges/<n>`` belongs to the ``charges`` source (HMAC, one anonymous client),
``GET /v1/orders/mine`` to ``orders`` (HMAC, named clients): each answers who the
client is and how many ``test_effects`` rows its source has; ``n = 0`` answers a 404
problem of the plugin's own, as a ``Response``.
"""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import text

from idemhook import Response, api_view

IDEMHOOK_BLUEPRINT = Blueprint("reads", __name__)


def _effects(db, source: str) -> int:
    query = text("SELECT count(*) FROM test_effects WHERE source = :source")
    return db.execute(query, {"source": source}).scalar_one()


@IDEMHOOK_BLUEPRINT.get("/v1/charges/<int:n>")
@api_view("charges")
def show_charge(client, db, n):
    if n == 0:
        body = {"type": "about:blank", "title": "Not found", "status": 404, "detail": "none"}
        return Response(404, body, {"Content-Type": "application/problem+json"})
    return {"client": client, "n": n, "effects": _effects(db, "charges")}


@IDEMHOOK_BLUEPRINT.get("/v1/orders/mine")
@api_view("orders")
def my_orders(client, db):
    return Response(200, {"client": client, "effects": _effects(db, "orders")}, {"X-Seen": "1"})
