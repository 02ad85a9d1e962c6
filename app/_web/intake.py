"""``POST /webhooks/<source>[/<tenant>]``: size and type checks, verification, parsing, the claim.

Checks run cheapest first and before anything is stored: unknown source (404), for
``/webhooks/<source>/<tenant>`` a tenant with no stored secret (404 ``unknown_tenant``) or
none live (401 ``no_live_secret``), body size (413, enforced before the body is read),
content type (415), signature (401: a tenant's delivery against that tenant's live secrets
only), JSON and event fields (400: the ID and type, and for a source with
``freshness`` each event's object and version). Only then does the claim open a
transaction: the claim that runs the handlers (:mod:`idemhook._engine.claim`), or for a source
with ``mode = "async"`` the one that records the events for ``idemhook worker``
and answers at once (:mod:`idemhook._engine.accept`).

Every 4xx answered before the claim (but ``unknown_source``: anyone could invent
names) is logged and recorded in ``rejected_deliveries`` by the blueprint's error
handlers, the one place that sees every error of its views, and costs a delivery
that is not refused nothing (:mod:`idemhook._engine.refusals`). A paused source
(``idemhook sources pause``) is verified and checked as ever, then accepted as an
asynchronous source's delivery is, for ``idemhook worker`` to apply after ``resume``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length, get_input_stream

from idemhook._config.events import events_of, for_tenant
from idemhook._config.freshness import versions_of
from idemhook._config.schemes import Delivery, Reply
from idemhook._config.sources import Source
from idemhook._engine.accept import Acceptor
from idemhook._engine.claim import Claimer, Outcome
from idemhook._engine.pauses import Pauses
from idemhook._engine.refusals import Refusal, Refusals
from idemhook._engine.tenants import Matches, Tenants, unknown_tenant
from idemhook._values.errors import (
    HTTP_CODES,
    HandlerFailed,
    IdemhookError,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    render,
    render_http,
)
from idemhook._values.headers import safe_headers
from idemhook._values.outcome import Status

bp = Blueprint("intake", __name__)
#: The endpoint of every webhook delivery (the request metrics' label).
ENDPOINT = "intake.receive"


class Receiver:
    """Per-app state of the intake: the sources, the claimer, the acceptor, the tenants'
    secrets and the tally of which secret verified each delivery, refusals, pauses."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        claimer: Claimer,
        acceptor: Acceptor,
        tenants: Tenants,
        refusals: Refusals | None = None,
        pauses: Pauses | None = None,
    ) -> None:
        self.sources = sources
        self.claimer = claimer
        self.acceptor = acceptor
        self.tenants = tenants
        self.matches: Matches = tenants.matches
        self.refusals = refusals
        self.pauses = pauses


def init_app(app: Flask, receiver: Receiver) -> None:
    app.extensions["idemhook.receiver"] = receiver
    app.register_blueprint(bp)


@bp.errorhandler(IdemhookError)
def _refused(error: IdemhookError) -> Response:
    """Every error of the intake's views: a 4xx before the claim is logged and recorded."""
    if 400 <= error.status_code < 500 and error.code != "unknown_source":
        _record(error.code, error.status_code, error.message, error.body)
    return render(error)


@bp.errorhandler(HTTPException)
def _refused_by_werkzeug(error: HTTPException) -> Response:
    """Werkzeug's own errors in the intake's views (a chunked body over the limit)."""
    status = error.code or 500
    if 400 <= status < 500:
        _record(HTTP_CODES.get(status, "http_error"), status, error.description or "", None)
    return render_http(error)


def _record(code: str, status: int, message: str, body: bytes | None) -> None:
    receiver: Receiver = current_app.extensions["idemhook.receiver"]
    view_args = request.view_args or {}
    source = receiver.sources.get(view_args.get("source_name", ""))
    if receiver.refusals is None or source is None:
        return
    headers = safe_headers(request.headers)
    # A scheme's own signature header, when its name says nothing (signature_header).
    secret = {name.lower() for name in source.scheme.secret_headers}
    if secret:
        headers = {k: v for k, v in headers.items() if k.lower() not in secret}
    receiver.refusals.record(
        Refusal(
            source=source.name,
            tenant=view_args.get("tenant"),
            code=code,
            status=status,
            message=message,
            received_at=datetime.now(UTC),
            client_addr=request.remote_addr,
            user_agent=request.headers.get("User-Agent"),
            body=body,
            headers=headers,
        )
    )


@bp.post("/webhooks/<source_name>")
@bp.post("/webhooks/<source_name>/<tenant>")
def receive(source_name: str, tenant: str | None = None) -> Response:
    received_at = datetime.now(UTC)
    receiver: Receiver = current_app.extensions["idemhook.receiver"]
    source = receiver.sources.get(source_name)
    if source is None:
        raise NotFound(
            f"No source named {source_name!r} is configured; "
            "add [sources.<name>] to the sources file.",
            code="unknown_source",
        )
    url = public_url(source) if source.scheme.signs_url else ""
    return render_reply(deliver(receiver, source, tenant, request.environ, url, received_at))


def deliver(
    receiver: Receiver,
    source: Source,
    tenant: str | None,
    environ: dict[str, Any],
    url: str,
    received_at: datetime,
) -> Reply:
    """One delivery to ``source`` (``tenant``'s when given), from its WSGI ``environ``: the
    answer, or an :class:`IdemhookError` (a refusal, a failed handler, a lost database).

    The one path of every webhook delivery, whether Flask dispatched it (:func:`receive`)
    or :mod:`idemhook._web.direct` did. ``url`` is the URL the sender called, for a
    scheme that signs it (else unused).
    """
    if tenant is None:
        if not source.own_secret:
            raise unknown_tenant(source, "")
        keys = secret_ids = None
    else:  # the tenant's live secrets: one indexed SELECT, nothing written
        secret_ids, keys = receiver.tenants.keys_for(source, tenant)
    body = read_body(source, environ)
    headers = EnvironHeaders(environ)
    try:
        delivery = Delivery(body, headers, environ["REQUEST_METHOD"], url)
        matched = source.scheme.verify(delivery, keys)
        if secret_ids is not None:
            receiver.matches.tenant(source.name, secret_ids[matched])
        elif source.scheme.keys:
            receiver.matches.static(source.name, matched)
        early = source.scheme.preempt(delivery)
        if early is not None:
            return early
        payload = source.scheme.parse(body)
        events = events_of(source, payload, headers, received_at)
        if tenant is not None:  # event IDs are scoped per tenant: <tenant>:<id>
            events = [for_tenant(event, tenant) for event in events]
        # Each event's object and version (400 if missing or malformed), before anything
        # is stored.
        versions = versions_of(source.freshness, events) if source.freshness else None
    except IdemhookError as error:
        error.body = body  # a refusal's size and SHA-256 (_refused); free when none is raised
        raise
    pauses = receiver.pauses
    paused = pauses is not None and pauses.paused(source.name)
    if source.asynchronous or paused:
        outcomes = receiver.acceptor.accept(source, events, versions, paused=paused)
        answer = source.scheme.respond(outcomes)
        return answer if answer is not None else acknowledge(source, outcomes)
    outcomes = receiver.claimer.apply(
        events,
        body,
        versions,
        lock_objects=source.batch is not None,
        body_is_payload=source.batch is None and source.scheme.parses_json,
    )
    answer = source.scheme.respond(outcomes)
    return answer if answer is not None else respond(source, outcomes)


def public_url(source: Source) -> str:
    """The URL the sender called: the configured public base URL, else the request's own.

    Schemes that sign the URL (HubSpot) need the address the provider used, not
    the one a reverse proxy forwarded to. X-Forwarded-* is honoured only when
    IDEMHOOK_TRUSTED_PROXIES says so (ProxyFix in create_app).
    """
    base = source.public_url or current_app.config.get("IDEMHOOK_PUBLIC_URL")
    if not base:
        return request.url
    query = request.query_string.decode("latin-1")
    return base.rstrip("/") + request.path + (f"?{query}" if query else "")


def read_body(source: Source, environ: dict[str, Any]) -> bytes:
    """The request's body, once its size and type are known to be acceptable to ``source``.

    Werkzeug's own functions, as Flask's ``request`` uses them: the same limits and the
    same errors whichever path dispatched the request.
    """
    # Refuse an oversized body before reading it. Without a Content-Length (chunked)
    # Werkzeug stops reading at max_content_length without saying so: allow one byte
    # more, so that a body which reaches it is known to be over the limit.
    limit = source.max_body_bytes
    length = get_content_length(environ)
    if length is not None and length > limit:
        raise PayloadTooLarge(
            f"The body is {length} bytes; source {source.name!r} accepts at most "
            f"{limit} (max_body_bytes)."
        )
    mimetype = _mimetype(environ.get("CONTENT_TYPE", ""))
    if mimetype not in source.content_types:
        raise UnsupportedMediaType(
            f"Content-Type {mimetype or '(none)'!r} is not accepted here; "
            f"send {' or '.join(source.content_types)}."
        )
    body = get_input_stream(environ, max_content_length=limit + 1).read()
    if len(body) > limit:
        raise PayloadTooLarge(
            f"The body is over {limit} bytes, the most source "
            f"{source.name!r} accepts (max_body_bytes)."
        )
    return body


@lru_cache(maxsize=64)
def _mimetype(content_type: str) -> str:
    """``request.mimetype`` of a Content-Type header (the few a sender uses, parsed once)."""
    return parse_options_header(content_type)[0].lower()


def respond(source: Source, outcomes: list[Outcome]) -> Reply:
    """200 when no event failed (processed, duplicate, ignored, rejected); else 500 (retry)."""
    failed = [o for o in outcomes if o.status == "failed"]
    if source.batch is None:
        outcome = outcomes[0]
        if failed:
            raise HandlerFailed(
                f"A handler failed for event {outcome.event_id!r} ({outcome.error}); nothing "
                "was recorded and a redelivery will run it again.",
                event_id=outcome.event_id,
            )
        return Reply(200, outcome.to_dict())
    events = [o.to_dict() for o in outcomes]
    if failed:
        if len(outcomes) == 1:
            message = (
                f"A handler failed for event {failed[0].event_id!r} ({failed[0].error}); "
                "nothing was recorded and a redelivery will run it again."
            )
        elif len(failed) == len(outcomes):
            message = (
                f"All {len(outcomes)} events failed; nothing was recorded and a redelivery "
                "of the batch runs them all again."
            )
        else:
            message = (
                f"{len(failed)} of {len(outcomes)} events failed; the others are recorded, so "
                "a redelivery of the whole batch applies only the failed ones."
            )
        raise HandlerFailed(message, events=events)
    return Reply(200, {"status": "ok", "events": events})


def acknowledge(source: Source, outcomes: list[Outcome]) -> Reply:
    """An asynchronous source's answer: ``ack_status`` while any event waits, else 200.

    A new event, or a duplicate of one still waiting for the worker, is
    ``accepted``; a duplicate of an event the worker has finished is answered with
    its stored result, as a synchronous source answers it.
    """
    waiting = any(o.status is Status.ACCEPTED for o in outcomes)
    status = source.ack_status if waiting else 200
    if source.batch is None:
        return Reply(status, outcomes[0].to_dict())
    events = [o.to_dict() for o in outcomes]
    return Reply(status, {"status": "accepted" if waiting else "ok", "events": events})


def render_reply(reply: Reply) -> Response:
    """The HTTP response for an answer, the intake's or a scheme's own (bytes as they are,
    else JSON); :class:`idemhook._web.direct.DirectDispatch` writes the same bytes."""
    if isinstance(reply.body, bytes):
        response = Response(reply.body, reply.status, content_type=reply.content_type)
    else:
        response = jsonify(reply.body)
        response.status_code = reply.status
        response.content_type = reply.content_type
    response.headers.extend(reply.headers)
    return response
