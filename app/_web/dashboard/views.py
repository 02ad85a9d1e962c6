"""The dashboard's pages: overview, events, one event (and its replay), failures, outbox,
refused deliveries (and paused sources).

Reads go through :mod:`idemhook._store.queries` (the read API's filters and keyset cursors);
actions through the functions the CLI runs: :func:`idemhook._engine.replay.replay` for
``events replay --force``, :func:`idemhook._engine.failures.retry_failure` for
``failures retry`` and :func:`idemhook._engine.outbox.retry` for ``outbox retry``. Access,
CSRF and the response headers are :mod:`.access`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from idemhook._config.sources import Source
from idemhook._engine import failures, replay
from idemhook._engine import outbox as outbox_actions
from idemhook._store import queries
from idemhook._store import refusals as refusals_store
from idemhook._store.database import (
    get_db,
    read_session,
    unavailable_when_lost,
)
from idemhook._store.models import EVENT_STATUSES, delivery_failures, processed_events
from idemhook._values.errors import IdemhookError, NotFound
from idemhook._values.headers import (
    safe_headers,
)
from idemhook._web.admin import token_matches
from idemhook._web.dashboard import access, formatting, outbox
from idemhook._web.dashboard import overview as overview_module
from idemhook._web.dashboard.chart import draw

EVENTS = processed_events
FAILURES = delivery_failures
PAGE = 50
#: Failures retried by one click on "Retry selected".
MAX_SELECTED = 100

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix=access.PREFIX,
    template_folder="templates",
    static_folder="static",
)


# -- every request ---------------------------------------------------------------------------


@bp.before_request
def _guard() -> Response | None:
    g.dashboard_started = time.perf_counter()
    access.require_enabled()
    if request.endpoint == "dashboard.static":
        return None
    if request.endpoint != "dashboard.login" and not access.logged_in():
        if access.wants_html():
            here = (
                request.script_root + request.full_path.rstrip("?")
                if request.method == "GET"
                else None
            )
            return redirect(url_for(".login", next=here), code=303)
        raise access.login_required()
    if request.method == "POST":
        access.check_csrf()
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.update(access.SECURITY_HEADERS)
    started = g.get("dashboard_started")
    if started is not None:
        # The server's own time for this page (a browser's developer tools show it).
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


@bp.app_context_processor
def _globals() -> dict[str, Any]:
    return {
        "csrf_token": access.csrf_token,
        "csrf_field": access.CSRF_FIELD,
        "logged_in": access.logged_in,
        # Formatting helpers, called as functions rather than registered as Jinja filters:
        # registering a filter builds the app's Jinja environment when the blueprint is
        # registered, for every app, and an app dropped without dispose then kept its
        # database connection (tests/test_lanes.py).
        "when": formatting.when,
        "ago": formatting.ago,
        "pretty": formatting.pretty,
        "percent": formatting.percent,
        "brief": outbox.brief,
    }


# -- helpers ---------------------------------------------------------------------------------


def _too_slow(exc: OperationalError) -> bool:
    """The statement ran into IDEMHOOK_STATEMENT_TIMEOUT_MS (PostgreSQL's query_canceled)."""
    return getattr(exc.orig, "pgcode", None) == "57014"


SLOW_FILTER = (
    "This filter matched too few of the newest rows to fill a page within "
    "IDEMHOOK_STATEMENT_TIMEOUT_MS: narrow it by source or time range."
)


def _receiver() -> Any:
    return current_app.extensions["idemhook.receiver"]


def register_url(source: Source | None, name: str) -> tuple[str, bool]:
    """The URL to register at the provider, and whether it was guessed from this request."""
    base = (source.public_url if source else None) or current_app.config.get("IDEMHOOK_PUBLIC_URL")
    guessed = not base
    root = (base or request.url_root).rstrip("/")
    # An API (idempotency-key) is called at its own path, when it has one.
    path = getattr(source.scheme, "path", None) if source else None
    return f"{root}{path or f'/webhooks/{name}'}", guessed


def distinct_sources(session: Session, table: Any) -> list[str]:
    """The sources present in ``table``, one index probe each (a loose index scan)."""
    column = table.c.source
    first = select(column).order_by(column).limit(1).scalar_subquery()
    walk = select(first.label("source")).cte("walk", recursive=True)
    following = (
        select(column).where(column > walk.c.source).order_by(column).limit(1).scalar_subquery()
    )
    walk = walk.union_all(select(following).where(walk.c.source.is_not(None)))
    return [s for s in session.scalars(select(walk.c.source)) if s is not None]


def known_sources(session: Session) -> list[str]:
    seen = set(_receiver().sources)
    seen.update(distinct_sources(session, EVENTS))
    seen.update(distinct_sources(session, FAILURES))
    return sorted(seen)


def _text_args(*names: str) -> dict[str, str]:
    values = {name: request.args.get(name, "").strip() for name in names}
    if any("\x00" in value for value in values.values()):
        raise queries.QueryError("Filters must not contain NUL characters.")
    return values


def _when_arg(value: str) -> datetime | None:
    return queries.parse_when(value) if value else None


#: Filters the read API's queries accept beyond these (``client``, once Idempotency-Key
#: sources have clients) are offered when :class:`idemhook._store.queries.Filters` has them.
#: Filters (and columns) beyond the webhook ones: Idempotency-Key sources' clients.
EXTRA_FILTERS = ("client",)


def _ids(raw: list[str]) -> list[int]:
    """The row IDs a form names (whole numbers of a BIGINT; anything else is left out)."""
    return sorted(
        {int(v) for v in raw if v.isascii() and v.isdigit() and len(v) <= 19 and int(v) < 2**63}
    )


def _back(default: str) -> str:
    return access.safe_next(request.form.get("back")) or default


# -- log in and out --------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | str:
    if request.method == "POST":
        target = access.safe_next(request.form.get("next"))
        if token_matches(request.form.get("token", "")):
            access.log_in()
            return redirect(target or url_for(".overview"), code=303)
        flash("That is not the admin token (IDEMHOOK_ADMIN_TOKEN).", "error")
        return redirect(url_for(".login", next=target), code=303)
    if access.logged_in():
        return redirect(url_for(".overview"), code=303)
    return render_template("dashboard/login.html", next=access.safe_next(request.args.get("next")))


@bp.post("/logout")
def logout() -> Response:
    access.log_out()
    flash("Logged out.", "info")
    return redirect(url_for(".login"), code=303)


# -- overview --------------------------------------------------------------------------------


@bp.get("", strict_slashes=False)
def overview() -> str:
    sources = _receiver().sources
    reconciled = sorted(current_app.extensions.get("idemhook.reconcile", {}))
    with read_session() as session:
        figures = overview_module.build(session, sorted(sources))
        # Per reconciled source: last run, recovered in 24 h, last error (docs/reconcile.md).
        reconcile = queries.reconcile_summary(session, reconciled)
        refused = queries.rejection_counts(session, figures.since)
        paused = refusals_store.pauses(session)
    for entry in figures.sources:
        entry.url, entry.url_guessed = register_url(sources.get(entry.name), entry.name)
    return render_template(
        "dashboard/overview.html",
        page="overview",
        figures=figures,
        chart=draw(figures.hours),
        sample=overview_module.SAMPLE,
        reconcile=reconcile,
        refused=sum(sum(codes.values()) for codes in refused.values()),
        refused_by_source={name: sum(codes.values()) for name, codes in refused.items()},
        paused=paused,
    )


# -- events ----------------------------------------------------------------------------------


@bp.get("/events")
def events() -> Response | str:
    optional = list(EXTRA_FILTERS)
    form: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    matches: list[dict[str, Any]] | None = None
    next_cursor = None
    error = None
    sources: list[str] = sorted(_receiver().sources)
    try:
        form = _text_args("source", "type", "status", "since", "until", "id", *optional)
        extra = {name: form[name] or None for name in optional}
        filters = queries.Filters(
            source=form["source"] or None,
            type=form["type"] or None,
            status=form["status"] or None,
            since=_when_arg(form["since"]),
            until=_when_arg(form["until"]),
            **extra,
        )
        with read_session() as session:
            sources = known_sources(session)
            if form["id"]:
                within = [form["source"]] if form["source"] else sources
                matches = find_event(session, within, form["id"])
                if len(matches) == 1:
                    only = matches[0]
                    return redirect(
                        url_for(".event", source=only["source"], event_id=only["event_id"]),
                        code=303,
                    )
            else:
                rows, next_cursor = queries.list_events(
                    session, filters, PAGE, request.args.get("cursor") or None
                )
    except queries.QueryError as exc:
        error = str(exc)
    except OperationalError as exc:
        if not _too_slow(exc):
            raise
        error = SLOW_FILTER
    shown = {k: v for k, v in form.items() if v}
    return render_template(
        "dashboard/events.html",
        page="events",
        form=form,
        rows=rows,
        matches=matches,
        next_url=url_for(".events", **shown, cursor=next_cursor) if next_cursor else None,
        first_url=url_for(".events", **shown) if request.args.get("cursor") else None,
        error=error,
        sources=sources,
        statuses=EVENT_STATUSES,
        optional=optional,
    )


def find_event(session: Session, sources: list[str], event_id: str) -> list[dict[str, Any]]:
    """Events with this exact ID in any of ``sources`` (recorded, or only failed so far)."""
    if not sources:
        return []
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for row in session.execute(
        select(EVENTS.c.source, EVENTS.c.event_id, EVENTS.c.event_type, EVENTS.c.status).where(
            EVENTS.c.source.in_(sources), EVENTS.c.event_id == event_id
        )
    ):
        found[(row.source, row.event_id)] = dict(row._mapping)
    for row in session.execute(
        select(FAILURES.c.source, FAILURES.c.event_id, func.max(FAILURES.c.event_type))
        .where(FAILURES.c.source.in_(sources), FAILURES.c.event_id == event_id)
        .group_by(FAILURES.c.source, FAILURES.c.event_id)
    ):
        found.setdefault(
            (row[0], row[1]),
            {"source": row[0], "event_id": row[1], "event_type": row[2], "status": "failed"},
        )
    return sorted(found.values(), key=lambda r: r["source"])


def _event_or_failures(
    session: Session, source: str, event_id: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    event = queries.get_event(session, source, event_id)
    if event is not None:
        return event, event.pop("failures")
    return None, queries.failures_of(session, source, event_id)


def _not_found(source: str, event_id: str) -> NotFound:
    return NotFound(
        f"No event {event_id!r} from source {source!r} is recorded (never received, or pruned).",
        code="event_not_found",
    )


@bp.get("/events/<source>/<path:event_id>")
def event(source: str, event_id: str) -> str:
    with read_session() as session:
        found, attempts = _event_or_failures(session, source, event_id)
        payload = found["payload"] if found else None
        if found is None and attempts:
            # Never applied: what it held is in its latest failure.
            payload = session.execute(
                select(FAILURES.c.payload).where(FAILURES.c.id == attempts[-1]["id"])
            ).scalar()
        messages = outbox.of_event(session, source, event_id) if found else []
    if found is None and not attempts:
        raise _not_found(source, event_id)
    headers = safe_headers((found or {}).get("headers") or {})
    return render_template(
        "dashboard/event.html",
        page="events",
        source=source,
        event_id=event_id,
        event=found,
        failures=attempts,
        payload=payload,
        headers=headers,
        messages=messages,
        configured=source in _receiver().sources,
    )


@bp.route("/replay/<source>/<path:event_id>", methods=["GET", "POST"])
def replay_event(source: str, event_id: str) -> Response | str:
    receiver = _receiver()
    if request.method == "GET":
        with read_session() as session:
            found = queries.get_event(session, source, event_id)
        if found is None:
            raise _not_found(source, event_id)
        handlers = [
            r.name for r in receiver.claimer.registry.for_event(source, found["event_type"])
        ]
        try:
            stale = replay.staleness(receiver.claimer, receiver.sources, source, event_id)
        except failures.ActionRefused:
            stale = None  # the replay itself says why it cannot run
        return render_template(
            "dashboard/replay.html",
            page="events",
            event=found,
            handlers=handlers,
            stale=stale,
        )
    try:
        replayed = replay.replay(receiver.claimer, source, event_id, receiver.sources)
    except (failures.ActionRefused, replay.ReplayFailed) as exc:
        flash(f"Not replayed: {exc}", "error")
    else:
        flash(
            f"Replayed (replay #{replayed['replay_count']}): the handlers ran again and "
            f"their result was stored.",
            "success",
        )
    return redirect(url_for(".event", source=source, event_id=event_id), code=303)


# -- failures --------------------------------------------------------------------------------


@bp.get("/failures")
def failures_page() -> str:
    rows: list[dict[str, Any]] = []
    next_cursor = None
    error = None
    form: dict[str, str] = {}
    sources: list[str] = sorted(_receiver().sources)
    show_all = request.args.get("all") == "1"
    try:
        form = _text_args("source", "type", "since")
        filters = queries.Filters(
            source=form["source"] or None,
            type=form["type"] or None,
            since=_when_arg(form["since"]),
            pending=not show_all,
        )
        with read_session() as session:
            sources = known_sources(session)
            rows, next_cursor = queries.list_failures(
                session, filters, PAGE, request.args.get("cursor") or None
            )
    except queries.QueryError as exc:
        error = str(exc)
    except OperationalError as exc:
        if not _too_slow(exc):
            raise
        error = SLOW_FILTER
    shown = {k: v for k, v in form.items() if v}
    if show_all:
        shown["all"] = "1"
    return render_template(
        "dashboard/failures.html",
        page="failures",
        rows=rows,
        form=form,
        show_all=show_all,
        sources=sources,
        error=error,
        next_url=url_for(".failures_page", **shown, cursor=next_cursor) if next_cursor else None,
        first_url=url_for(".failures_page", **shown) if request.args.get("cursor") else None,
        here=url_for(".failures_page", **shown, cursor=request.args.get("cursor") or None),
    )


@bp.post("/failures/retry")
def retry_failures() -> Response:
    """Retry the failure of one button, or the selected ones, through the live claim."""
    picked = request.form.get("only") or None
    raw = [picked] if picked else request.form.getlist("failure")
    ids = _ids(raw)[:MAX_SELECTED]
    back = _back(url_for(".failures_page"))
    if not ids:
        flash("Select at least one failure to retry.", "error")
        return redirect(back, code=303)
    with read_session() as session:
        targets = [
            (row.source, row.event_id)
            for row in session.execute(
                select(FAILURES.c.source, FAILURES.c.event_id)
                .where(FAILURES.c.id.in_(ids))
                .group_by(FAILURES.c.source, FAILURES.c.event_id)
                .order_by(func.min(FAILURES.c.failed_at))
            )
        ]
    receiver = _receiver()
    for source, event_id in targets:
        try:
            result = failures.retry_failure(receiver.claimer, receiver.sources, source, event_id)
        except (failures.ActionRefused, IdemhookError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            result = failures.RetryResult(source, event_id, "refused", message)
        category = "error" if result.status in ("failed", "refused") else "success"
        detail = result.detail if isinstance(result.detail, str) else None
        flash(
            f"{source}/{event_id}: {result.status}" + (f" ({detail})" if detail else ""),
            category,
        )
    return redirect(back, code=303)


# -- outbox ----------------------------------------------------------------------------------


@bp.get("/outbox")
def outbox_page() -> str:
    status = request.args.get("status") or None
    if status not in (None, *outbox.STATUSES):
        status = None
    cursor = request.args.get("cursor") or None
    rows: list[dict[str, Any]] = []
    next_cursor = None
    error = None
    with read_session() as session:
        summary = outbox.summary(session)
        try:
            rows, next_cursor = outbox.messages(session, status, cursor)
        except queries.QueryError as exc:
            error = str(exc)
    return render_template(
        "dashboard/outbox.html",
        page="outbox",
        summary=summary,
        rows=rows,
        status=status,
        statuses=outbox.STATUSES,
        error=error,
        next_url=url_for(".outbox_page", status=status, cursor=next_cursor)
        if next_cursor
        else None,
        first_url=url_for(".outbox_page", status=status) if cursor else None,
        here=url_for(".outbox_page", status=status, cursor=cursor),
    )


@bp.get("/outbox/<int:message_id>")
def outbox_message(message_id: int) -> str:
    with read_session() as session:
        message = queries.get_message(session, message_id) if message_id < 2**63 else None
    if message is None:
        raise NotFound(
            f"No outbox message {message_id} is recorded (never added, or pruned).",
            code="message_not_found",
        )
    return render_template("dashboard/message.html", page="outbox", message=message)


@bp.post("/outbox/retry")
def retry_outbox() -> Response:
    """Make the message of one button, or the selected ones, due now: ``outbox retry``'s path."""
    picked = request.form.get("only") or None
    raw = [picked] if picked else request.form.getlist("message")
    ids = _ids(raw)
    back = _back(url_for(".outbox_page"))
    if not ids:
        flash("Select at least one message to retry.", "error")
        return redirect(back, code=303)
    with unavailable_when_lost():
        results = outbox_actions.retry(get_db().engine, ids[:MAX_SELECTED])
    retried = [r.id for r in results if r.status == "retrying"]
    if retried:
        listed = ", ".join(str(i) for i in retried)
        flash(f"Due now, with a fresh set of attempts: message(s) {listed}.", "success")
    for result in results:
        if result.status != "retrying":
            flash(f"Message {result.id} not retried: {result.detail}.", "error")
    return redirect(back, code=303)


# -- refused deliveries ----------------------------------------------------------------------


@bp.get("/refused")
def refused_page() -> str:
    """Deliveries refused before the claim: per source counts by code (24 h), the latest rows."""
    source = request.args.get("source") or None
    cursor = request.args.get("cursor") or None
    since = datetime.now(UTC) - timedelta(hours=24)
    rows: list[dict[str, Any]] = []
    next_cursor = None
    error = None
    with read_session() as session:
        counts = queries.rejection_counts(session, since)
        paused = refusals_store.pauses(session)
        try:
            rows, next_cursor = queries.list_rejections(
                session, queries.Filters(source=source), PAGE, cursor
            )
        except queries.QueryError as exc:
            error = str(exc)
    codes = sorted({code for by_code in counts.values() for code in by_code})
    return render_template(
        "dashboard/refused.html",
        page="refused",
        counts=counts,
        codes=codes,
        rows=rows,
        source=source,
        since=since,
        paused=paused,
        error=error,
        next_url=url_for(".refused_page", source=source, cursor=next_cursor)
        if next_cursor
        else None,
        first_url=url_for(".refused_page", source=source) if cursor else None,
    )
