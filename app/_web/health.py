"""``GET /healthz`` (the process answers) and ``GET /readyz`` (database usable, schema current)."""

from __future__ import annotations

from flask import Blueprint, Flask, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from idemhook._store import migrate

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
    missing, unknown = migrate.compare(current_app, applied)
    if missing and not unknown:
        return jsonify(
            {
                "status": "unavailable",
                "database": "migrations behind",
                "applied": sorted(applied),
                "expected": sorted(migrate.heads(current_app)),
            }
        ), 503
    # A newer release may have migrated further (rolling deploy): still ready.
    state = "ahead" if unknown else "ok"
    return jsonify({"status": "ok", "database": state, "revision": sorted(applied)})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
