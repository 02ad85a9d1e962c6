"""``GET /healthz`` (the process answers) and ``GET /readyz`` (database usable, schema current)."""

from __future__ import annotations

from flask import Blueprint, Flask, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from . import migrate

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    try:
        applied = migrate.current(current_app)
    except SQLAlchemyError:
        return jsonify({"status": "unavailable", "database": "unreachable"}), 503
    # The code's heads never change while it runs: read the migration scripts once.
    heads = current_app.extensions.get("idemhook.heads")
    if heads is None:
        heads = current_app.extensions["idemhook.heads"] = migrate.heads(current_app)
    if applied != heads:
        return jsonify(
            {
                "status": "unavailable",
                "database": "migrations behind",
                "applied": sorted(applied),
                "expected": sorted(heads),
            }
        ), 503
    return jsonify({"status": "ok", "database": "ok", "revision": sorted(applied)})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
