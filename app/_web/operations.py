"""``POST <path>`` (and ``POST /webhooks/<source>``) of an ``idempotency-key`` source: an API.

Checks run as the webhook intake's do, cheapest first and before anything is stored:
body size (413), content type (415), the client's credentials (401), the
``Idempotency-Key`` (400), the JSON (400). Then the key is claimed
(:mod:`idemhook._engine.keys`) and the answer is the operation's own: the status, body and
headers a handler chose with ``Response``, stored with the key and replayed to every
retry with ``Idempotent-Replayed: true``. Errors are RFC 9457 problem details
(:mod:`idemhook._web.problems`).

These routes are registered per source, as static rules: the webhook intake never
sees an ``idempotency-key`` source, so webhooks pay nothing for any of this.

A plugin serves the rest of its API (``GET /v1/emails/<id>``) from its own Flask
blueprint (``IDEMHOOK_BLUEPRINT``, :mod:`idemhook._engine.registry`); :func:`api_view` makes such a
view authenticate the source's clients exactly as ``POST`` does and answer as the
API does (its ``Response``, problem details).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.wsgi import get_path_info

from idemhook._config.events import event_type_of
from idemhook._config.schemes import Delivery
from idemhook._config.schemes.idempotency_key import KEY_HEADER, IdempotencyKey, parse_key
from idemhook._config.sources import Source
from idemhook._contract import (
    CONTENT_TYPE,
    ClientEvent,
)
from idemhook._contract import (
    Response as Operation,
)
from idemhook._engine.claim import Claimer
from idemhook._engine.keys import Answer, KeyClaimer, KeyRequest
from idemhook._engine.tenants import Matches
from idemhook._store.database import read_session
from idemhook._values.errors import BadRequest, ConfigError, IdemhookError
from idemhook._web import problems
from idemhook._web.intake import read_body

#: The endpoints (metrics label requests by endpoint): one for /webhooks/<name>, one for
#: the paths. Two rules of one endpoint with the same defaults would make Werkzeug
#: redirect one URL to the other.
ENDPOINT = "operations.receive"
PATH_ENDPOINT = "operations.receive_path"
REPLAYED_HEADER = "Idempotent-Replayed"
#: Attribute of a view made by :func:`api_view`: the API source it belongs to.
_API_VIEW_MARK = "__idemhook_api_source__"


class Operations:
    """Per-app state: the ``idempotency-key`` sources and their claimer."""

    def __init__(
        self, sources: Mapping[str, Source], claimer: Claimer, matches: Matches | None = None
    ) -> None:
        self.sources = sources
        self.keys = KeyClaimer(claimer)
        #: Which client secret authenticated each request (``idemhook sources``, the metric).
        self.matches = matches


def init_app(
    app: Flask, sources: Mapping[str, Source], claimer: Claimer, matches: Matches | None = None
) -> None:
    """Serve each ``idempotency-key`` source at ``/webhooks/<name>`` and at its ``path``.

    Call it after every other route is registered: a ``path`` that another route
    already serves (``/events``, another source's path) stops start-up.
    """
    operated = {name: s for name, s in sources.items() if s.scheme.operation}
    app.extensions["idemhook.operations"] = Operations(operated, claimer, matches)
    _check_api_views(app, operated)
    for name, source in operated.items():
        scheme = source.scheme
        assert isinstance(scheme, IdempotencyKey)
        rules = [(f"/webhooks/{name}", ENDPOINT)]
        if scheme.path is not None:
            _check_free(app, name, scheme.path)
            rules.append((scheme.path, PATH_ENDPOINT))
        for rule, endpoint in rules:
            app.add_url_rule(
                rule,
                endpoint=endpoint,
                view_func=receive,
                methods=["POST"],
                defaults={"source_name": name},
            )


def _check_free(app: Flask, name: str, path: str) -> None:
    try:
        endpoint, values = app.url_map.bind("localhost").match(path, method="POST")
    except NotFound:
        return
    except HTTPException:  # served for other methods, or a redirect (a trailing slash)
        endpoint, values = "", {}
    taken = values.get("source_name") if endpoint in (ENDPOINT, PATH_ENDPOINT) else None
    what = f"source {taken!r}" if taken else "one of idemhook's own routes"
    raise ConfigError(f"[sources.{name}] path: {path!r} is already served by {what}")


def _check_api_views(app: Flask, operated: Mapping[str, Source]) -> None:
    """Every ``@api_view(source)`` of a plugin's routes names an API source of the file."""
    for endpoint, view in app.view_functions.items():
        name = getattr(view, _API_VIEW_MARK, None)
        if name is not None and name not in operated:
            known = ", ".join(sorted(operated)) or "none"
            raise ConfigError(
                f"route {endpoint}: @api_view({name!r}) names no idempotency-key source of "
                f"the sources file (its idempotency-key sources: {known})"
            )


def api_view(source: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a plugin's Flask view part of the API of ``source`` (an ``idempotency-key`` source).

    The view is called as ``view(client, db, **route_values)``, after the request's
    credentials were checked as a ``POST`` to the source checks them (a bearer token,
    or HMAC over the ``Idempotency-Key`` header, if any, ``.`` and the body): ``client``
    is the client's name (None for the anonymous client of ``secret``), ``db`` a
    SQLAlchemy session for reading (closed afterwards; nothing is committed). It returns
    a ``Response(status, body, headers)`` or a plain value (200 with it as the body).
    Missing or wrong credentials answer 401 and a lost database 503, as problem
    details, before and instead of the view.
    """
    if not isinstance(source, str) or not source:
        raise TypeError("api_view(source): the name of an idempotency-key source")

    def wrap(view: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(view):
            raise TypeError("@api_view decorates a view function")

        @functools.wraps(view)
        def serve(**values: Any) -> Response:
            operations: Operations = current_app.extensions["idemhook.operations"]
            scheme = operations.sources[source].scheme
            assert isinstance(scheme, IdempotencyKey)
            try:
                client = scheme.authenticate(
                    Delivery(request.get_data(), request.headers, request.method)
                )
                with read_session() as db:
                    answer = view(client, db, **values)
            except IdemhookError as error:
                return problems.render(error)
            if not isinstance(answer, Operation):
                answer = Operation(200, answer)
            return render(Answer(answer.status, answer.body, answer.headers))

        setattr(serve, _API_VIEW_MARK, source)
        return serve

    return wrap


def receive(source_name: str) -> Response:
    received_at = datetime.now(UTC)
    operations: Operations = current_app.extensions["idemhook.operations"]
    source = operations.sources[source_name]
    failed_type = problems.type_uri("handler_failed")
    try:
        answer = operate(operations, source, request.environ, received_at, failed_type)
    except IdemhookError as error:
        return problems.render(error)
    except HTTPException as error:  # Werkzeug's, while reading the body
        return problems.render_http(error)
    return render(answer)


def operate(
    operations: Operations,
    source: Source,
    environ: dict[str, Any],
    received_at: datetime,
    failed_type: str,
) -> Answer:
    """One request to the API ``source``, from its WSGI ``environ``: the operation's answer
    (run now, or replayed), or an :class:`IdemhookError` (or Werkzeug's, reading the body).

    The one path of every API request, whether Flask dispatched it (:func:`receive`) or
    :mod:`idemhook._web.direct` did. ``failed_type``: the problem type of a failed
    operation (:func:`problems.type_uri`), stored with its answer when errors are replayed.
    """
    scheme = source.scheme
    assert isinstance(scheme, IdempotencyKey)
    body = read_body(source, environ)
    headers = EnvironHeaders(environ)
    method = environ["REQUEST_METHOD"]
    client, index = scheme.authenticate_which(Delivery(body, headers, method))
    if operations.matches is not None:
        operations.matches.client(source.name, client, index)
    key = parse_key(headers.get(KEY_HEADER))
    payload = scheme.parse(body)
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be one JSON object.", code="invalid_event")
    event = ClientEvent(
        source.name,
        scheme.event_id(client, key),
        event_type_of(source, payload, headers),
        payload,
        headers,
        received_at,
        client,
    )
    query = environ.get("QUERY_STRING", "")
    fingerprint = scheme.fingerprint_of(
        method,
        request_path(environ) + (f"?{query}" if query else ""),
        headers.get("Content-Type", ""),
        body,
    )
    key_request = KeyRequest(
        event,
        key,
        fingerprint,
        body,
        scheme.key_ttl,
        replay_errors=scheme.replay_errors,
        failed_type=failed_type,
    )
    return operations.keys.apply(key_request)


def request_path(environ: dict[str, Any]) -> str:
    """Werkzeug's ``request.path`` of ``environ``: PATH_INFO decoded, one leading slash."""
    return "/" + get_path_info(environ).lstrip("/")


def render(answer: Answer) -> Response:
    """The operation's answer: its status, its JSON body, its headers; a replay says so."""
    response = jsonify(answer.body)
    response.status_code = answer.status
    for name, value in answer.headers:
        if name == CONTENT_TYPE:  # a JSON media type the handler chose (problem details)
            response.content_type = value
        else:
            response.headers.add(name, value)
    if answer.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response
