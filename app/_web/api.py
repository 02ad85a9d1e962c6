"""The read API: ``GET /events``, ``/events/<source>/<event_id>``, ``/events/stats``, ``/failures``,
``/outbox``, ``/outbox/<id>``, ``/reconcile``, ``/reconcile/runs``,
``/objects/<source>/<object>`` and ``/rejections``.

Enabled only when ``IDEMHOOK_ADMIN_TOKEN`` is set (otherwise every route here
answers 404), and then only for ``Authorization: Bearer <token>``. The token is
checked before anything else, so a caller without it learns nothing, not even
whether an event exists. Queries are those of the CLI (:mod:`idemhook._store.queries`).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from idemhook._store import object_versions, queries
from idemhook._store.database import read_session
from idemhook._values.errors import BadRequest, ConfigError, NotFound
from idemhook._values.outbox_status import MESSAGE_STATUSES
from idemhook._web.admin import require_admin_token

bp = Blueprint("api", __name__)

_LIST_PARAMS = {"source", "type", "since", "until", "limit", "cursor"}
_EVENT_PARAMS = _LIST_PARAMS | {"status", "client"}
_FAILURE_PARAMS = _LIST_PARAMS | {"pending"}
_STATS_PARAMS = {"source", "type", "since", "until", "by"}
_REJECTION_PARAMS = {"source", "code", "since", "until", "limit", "cursor"}
_OUTBOX_PARAMS = {"kind", "status", "source", "since", "until", "limit", "cursor"}


@bp.before_request
def _authorize() -> None:
    require_admin_token()


def _args(allowed: set[str]) -> dict[str, str]:
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        raise BadRequest(
            f"Unknown query parameter {unknown[0]!r}; this endpoint accepts "
            f"{', '.join(sorted(allowed))}.",
            code="invalid_parameter",
        )
    args = {key: request.args[key] for key in request.args}
    _no_nul(*args.values())
    return args


def _no_nul(*values: str) -> None:
    # PostgreSQL text cannot hold NUL: refuse it here rather than fail in the driver.
    if any("\x00" in value for value in values):
        raise BadRequest("Parameters must not contain NUL characters.", code="invalid_parameter")


def _filters(args: dict[str, str]) -> queries.Filters:
    try:
        since = queries.parse_when(args["since"]) if "since" in args else None
        until = queries.parse_when(args["until"]) if "until" in args else None
    except queries.QueryError as exc:
        raise BadRequest(str(exc), code=exc.code) from None
    pending = args.get("pending", "false").lower()
    if pending not in ("true", "false", "1", "0"):
        raise BadRequest("pending must be true or false.", code="invalid_parameter")
    return queries.Filters(
        source=args.get("source"),
        type=args.get("type"),
        status=args.get("status"),
        since=since,
        until=until,
        pending=pending in ("true", "1"),
        client=args.get("client"),
    )


def _limit(args: dict[str, str]) -> int:
    raw = args.get("limit", str(queries.DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= queries.MAX_LIMIT:
        raise BadRequest(
            f"limit must be a whole number from 1 to {queries.MAX_LIMIT}, got {raw!r}.",
            code="invalid_parameter",
        )
    return int(raw)


def _page(lister: Any, key: str, allowed: set[str]) -> Response:
    args = _args(allowed)
    filters, limit = _filters(args), _limit(args)
    try:
        with read_session() as session:
            rows, next_cursor = lister(session, filters, limit, args.get("cursor") or None)
    except queries.QueryError as exc:
        raise BadRequest(str(exc), code=exc.code) from None
    return jsonify({key: rows, "next": next_cursor})


@bp.get("/events")
def list_events() -> Response:
    return _page(queries.list_events, "events", _EVENT_PARAMS)


@bp.get("/events/stats")
def event_stats() -> Response:
    args = _args(_STATS_PARAMS)
    filters = _filters(args)
    try:
        with read_session() as session:
            return jsonify(queries.stats(session, filters, args.get("by", "type")))
    except queries.QueryError as exc:
        raise BadRequest(str(exc), code=exc.code) from None


@bp.get("/events/<source>/<path:event_id>")
def show_event(source: str, event_id: str) -> Response:
    """One event; ``?client=acme`` reads ``event_id`` as that client's Idempotency-Key."""
    client = _args({"client"}).get("client")
    _no_nul(source, event_id)
    with read_session() as session:
        event = queries.get_event(session, source, queries.event_id_of(event_id, client))
    if event is None:
        raise NotFound(
            f"No event {event_id!r} from source {source!r} is recorded "
            "(never received, failed, or pruned).",
            code="event_not_found",
        )
    return jsonify(event)


@bp.get("/failures")
def list_failures() -> Response:
    return _page(queries.list_failures, "failures", _FAILURE_PARAMS)


@bp.get("/rejections")
def list_rejections() -> Response:
    """Refused deliveries, newest first; ``?code=`` narrows to one error code."""
    args = _args(_REJECTION_PARAMS)
    if "code" in args:
        args["type"] = args.pop("code")
    filters, limit = _filters(args), _limit(args)
    try:
        with read_session() as session:
            rows, next_cursor = queries.list_rejections(
                session, filters, limit, args.get("cursor") or None
            )
    except queries.QueryError as exc:
        raise BadRequest(str(exc), code=exc.code) from None
    return jsonify({"rejections": rows, "next": next_cursor})


@bp.get("/outbox")
def list_outbox() -> Response:
    args = _args(_OUTBOX_PARAMS)
    base = _filters({k: v for k, v in args.items() if k in ("since", "until")})
    status = args.get("status")
    if status is not None and status not in MESSAGE_STATUSES:
        raise BadRequest(
            f"status must be one of {', '.join(MESSAGE_STATUSES)}, got {status!r}.",
            code="invalid_parameter",
        )
    filters = queries.OutboxFilters(
        kind=args.get("kind"),
        status=status,
        source=args.get("source"),
        since=base.since,
        until=base.until,
    )
    limit = _limit(args)
    try:
        with read_session() as session:
            rows, next_cursor = queries.list_outbox(
                session, filters, limit, args.get("cursor") or None
            )
    except queries.QueryError as exc:
        raise BadRequest(str(exc), code=exc.code) from None
    return jsonify({"messages": rows, "next": next_cursor})


@bp.get("/outbox/<message_id>")
def show_message(message_id: str) -> Response:
    _args(set())
    if not message_id.isascii() or not message_id.isdigit() or int(message_id) >= 2**63:
        raise NotFound(
            f"No outbox message {message_id!r}: message IDs are whole numbers.",
            code="message_not_found",
        )
    with read_session() as session:
        message = queries.get_message(session, int(message_id))
    if message is None:
        raise NotFound(
            f"No outbox message {message_id} is recorded (never added, or pruned).",
            code="message_not_found",
        )
    return jsonify(message)


@bp.get("/reconcile")
def reconcile_summary() -> Response:
    """Per reconciled source: its last run, recovered in 24 h, last error (docs/reconcile.md)."""
    _args(set())
    configured = sorted(current_app.extensions.get("idemhook.reconcile", {}))
    with read_session() as session:
        return jsonify({"sources": queries.reconcile_summary(session, configured)})


@bp.get("/reconcile/runs")
def list_reconcile_runs() -> Response:
    args = _args({"source", "limit", "cursor"})
    limit = _limit(args)
    try:
        with read_session() as session:
            rows, next_cursor = queries.list_runs(
                session, args.get("source"), limit, args.get("cursor") or None
            )
    except queries.QueryError as exc:
        raise BadRequest(str(exc), code=exc.code) from None
    return jsonify({"runs": rows, "next": next_cursor})


@bp.get("/objects/<source>/<path:object_key>")
def show_object(source: str, object_key: str) -> Response:
    """The version applied to one object of a source with freshness, and its event."""
    _args(set())
    _no_nul(source, object_key)
    with read_session() as session:
        found = object_versions.show(session.connection(), source, object_key)
    if found is None or found["event_id"] is None:
        raise NotFound(
            f"No version is recorded for object {object_key!r} of source {source!r} (none "
            "of its events applied yet, no freshness configured, or pruned).",
            code="object_not_found",
        )
    return jsonify(queries.object_view(found))


def init_app(app: Flask) -> None:
    token = app.config.get("IDEMHOOK_ADMIN_TOKEN")
    if token and len(str(token)) < 16:
        raise ConfigError("IDEMHOOK_ADMIN_TOKEN must be at least 16 characters long")
    app.register_blueprint(bp)
