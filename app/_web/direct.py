"""Deliveries and API requests answered without Flask's per-request machinery, when nothing
could tell.

Flask spends about 340,000 instructions on every request around its view: the
request and application contexts, URL matching, the ``Request`` and ``Response``
objects, signals, teardown (a view that answers a constant, counted by callgrind;
docs/performance.md). The bench's baseline, a Flask view, does all of its own work
in about 300,000. For the paths senders call at volume, ``POST /webhooks/<source>``
(and ``/webhooks/<source>/<tenant>``) and an API source's ``POST`` path,
:class:`DirectDispatch` runs the same one function Flask's view runs
(:func:`idemhook._web.intake.deliver`, :func:`idemhook._web.operations.operate`)
straight from the WSGI environ and writes its answer itself. Every other request, and
every one where something could see the difference, goes through Flask as before:

- a path Flask would route elsewhere (checked against Flask's own URL map once, at
  the first request, when every blueprint has registered its rules), a source whose
  scheme signs the URL (the URL is Flask's ``request.url``);
- an app in debug mode, whose JSON answers are not compact, or that checks the Host
  header (Flask's ``TRUSTED_HOSTS`` or ``SERVER_NAME``);
- any hook or signal a plugin or extension registered that a request would run:
  ``before_request``, ``after_request``, ``teardown_request``, ``teardown_appcontext``,
  URL value preprocessors, and receivers of Flask's request signals (an error
  tracker's, say);
- an answer Werkzeug would rewrite (no body for a 204, 304 or 1xx; a header value
  that it refuses).

Errors keep Flask's handling exactly: a request whose function raises (a refusal, a
failed handler, a lost database) is answered inside Flask's request context for the
same environ, by the code Flask's view would have run (the intake blueprint's error
handlers, the API's problem details) and then the app's handlers, as Flask's dispatch
would. ``tests/test_direct_dispatch.py`` sends each kind of request down both paths and
compares status, headers, body and what was stored.

Handlers are unaffected: they never run in Flask's context (the claim runs on a claim
thread, :mod:`idemhook._engine.watchdog`, or, for ``database_only`` handlers, on this
thread outside any Flask context).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from flask import Flask, signals
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.urls import iri_to_uri

from idemhook._config.sources import Source
from idemhook._contract import CONTENT_TYPE
from idemhook._engine.keys import Answer
from idemhook._values.errors import IdemhookError
from idemhook._web import intake, metrics, operations, problems

PREFIX = "/webhooks/"
#: The request signals whose receivers must see every request (Flask sends them).
_SIGNALS = (
    signals.request_started,
    signals.request_finished,
    signals.request_tearing_down,
    signals.got_request_exception,
    signals.appcontext_pushed,
    signals.appcontext_popped,
    signals.appcontext_tearing_down,
)
#: The scopes of the hooks a request to one of the direct endpoints runs: the app's (None)
#: and its endpoint's blueprint's (Flask takes an endpoint's prefix as its blueprint).
_SCOPES = (None, intake.ENDPOINT.rpartition(".")[0], operations.ENDPOINT.rpartition(".")[0])
#: Statuses whose answers Werkzeug sends without a body: Flask renders those.
_BODILESS = frozenset((204, 304, *range(100, 200)))
#: Headers Werkzeug rewrites as URIs when it sends them.
_URI_HEADERS = ("location", "content-location")
#: A path of unreserved characters, which ``iri_to_uri`` gives back as it is.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9._~/-]*")

Route = tuple[str, Source, str]  # kind, source, endpoint
WEBHOOK = "webhook"
OPERATION = "operation"


class DirectDispatch:
    """WSGI middleware around Flask's ``wsgi_app``: the direct path of senders' requests."""

    def __init__(self, app: Flask, wsgi_app: Any, receiver: intake.Receiver) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.receiver = receiver
        #: Exact paths served directly; sources whose tenants' paths are. Built at the
        #: first request (:meth:`_build`).
        self._routes: dict[str, Route] | None = None
        self._tenanted: dict[str, Source] = {}
        self._status_lines: dict[int, str] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "POST":
            return self.wsgi_app(environ, start_response)
        routes = self._routes if self._routes is not None else self._build()
        path = environ.get("PATH_INFO", "")
        route = routes.get(path)
        tenant = None
        if route is None and path.startswith(PREFIX) and self._tenanted:
            name, _, tenant = path[len(PREFIX) :].partition("/")
            source = self._tenanted.get(name)
            if source is not None and tenant and "/" not in tenant and tenant.isascii():
                route = (WEBHOOK, source, intake.ENDPOINT)
        if route is None or self._observed():
            return self.wsgi_app(environ, start_response)
        kind, source, endpoint = route
        metrics.note_endpoint(endpoint)
        if kind == WEBHOOK:
            return self._deliver(environ, start_response, source, tenant)
        return self._operate(environ, start_response, source)

    def _deliver(
        self, environ: dict[str, Any], start_response: Any, source: Source, tenant: str | None
    ) -> Any:
        received_at = datetime.now(UTC)
        try:
            reply = intake.deliver(self.receiver, source, tenant, environ, "", received_at)
        except Exception as error:  # noqa: BLE001 - Flask's error handlers decide, as ever
            return self._in_flask(environ, start_response, _raising(error))
        if reply.status in _BODILESS:
            return self._in_flask(environ, start_response, partial(intake.render_reply, reply))
        return self._send(
            start_response, reply.status, reply.body, reply.content_type, reply.headers
        )

    def _operate(self, environ: dict[str, Any], start_response: Any, source: Source) -> Any:
        received_at = datetime.now(UTC)
        state: operations.Operations = self.app.extensions["idemhook.operations"]
        failed_type = problems.type_uri_of(self.app.config, environ, "handler_failed")
        try:
            answer = operations.operate(state, source, environ, received_at, failed_type)
        except IdemhookError as error:
            return self._in_flask(environ, start_response, partial(problems.render, error))
        except HTTPException as error:  # Werkzeug's, while reading the body
            return self._in_flask(environ, start_response, partial(problems.render_http, error))
        except Exception as error:  # noqa: BLE001 - the app's handler answers, as ever
            return self._in_flask(environ, start_response, _raising(error))
        headers = _operation_headers(answer)
        if headers is None or answer.status in _BODILESS:
            return self._in_flask(environ, start_response, partial(operations.render, answer))
        content_type, extra = headers
        return self._send(start_response, answer.status, answer.body, content_type, extra)

    def _send(
        self,
        start_response: Any,
        status: int,
        body: Any,
        content_type: str,
        extra: tuple[tuple[str, str], ...] | list[tuple[str, str]],
    ) -> list[bytes]:
        """The bytes Flask's ``jsonify`` (or a bytes ``Response``) would send."""
        if not isinstance(body, bytes):  # as jsonify: compact (checked in _observed), a newline
            body = (self.app.json.dumps(body, separators=(",", ":")) + "\n").encode()
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        headers.extend(extra)
        line = self._status_lines.get(status)
        if line is None:
            phrase = HTTP_STATUS_CODES.get(status, "UNKNOWN").upper()
            line = self._status_lines[status] = f"{status} {phrase}"
        start_response(line, headers)
        return [body]

    def _in_flask(
        self, environ: dict[str, Any], start_response: Any, view: Callable[[], Any]
    ) -> Any:
        """Answer with ``view``'s return inside Flask's request context for ``environ``, as
        Flask's dispatch would: an error it raises to the app's and the blueprint's error
        handlers, then to ``handle_exception`` for what none of them takes."""
        app = self.app
        context = app.request_context(environ)
        context.push()
        try:
            try:
                try:
                    answer = view()
                except Exception as error:  # noqa: BLE001 - as Flask.full_dispatch_request
                    answer = app.handle_user_exception(error)
                response = app.finalize_request(answer)
            except Exception as unhandled:  # noqa: BLE001 - as Flask.wsgi_app
                response = app.handle_exception(unhandled)
            return response(environ, start_response)
        finally:
            context.pop(None)

    def _observed(self) -> bool:
        """Whether anything registered on the app would see a request's dispatch."""
        app = self.app
        if app.debug or getattr(app.json, "compact", None) is False:
            return True
        config = app.config
        if config.get("TRUSTED_HOSTS") or config.get("SERVER_NAME"):
            return True  # Flask checks the Host header (and routes by it)
        for hooks in (
            app.before_request_funcs,
            app.after_request_funcs,
            app.teardown_request_funcs,
            app.url_value_preprocessors,
        ):
            for scope in _SCOPES:
                if hooks.get(scope):
                    return True
        return bool(app.teardown_appcontext_funcs) or any(s.receivers for s in _SIGNALS)

    def _build(self) -> dict[str, Route]:
        """The paths Flask's URL map gives to the intake's and the API's views, by path.

        Built whole, then published (tenants first): threads that race to the first
        request each build the same tables, and none reads a half-built one.
        """
        adapter = self.app.url_map.bind("localhost")
        routes: dict[str, Route] = {}
        tenanted: dict[str, Source] = {}
        for name, source in self.receiver.sources.items():
            scheme = source.scheme
            if scheme.operation:
                paths = [(PREFIX + name, operations.ENDPOINT)]
                if getattr(scheme, "path", None):
                    paths.append((scheme.path, operations.PATH_ENDPOINT))
                for path, endpoint in paths:
                    if _routed(adapter, path, endpoint, name):
                        routes[path] = (OPERATION, source, endpoint)
            elif not scheme.signs_url:
                if _routed(adapter, PREFIX + name, intake.ENDPOINT, name):
                    routes[PREFIX + name] = (WEBHOOK, source, intake.ENDPOINT)
                tenanted[name] = source
        # A tenant's path is served directly only when no other rule could take one.
        for rule in self.app.url_map.iter_rules():
            rest = rule.rule[len(PREFIX) :] if rule.rule.startswith(PREFIX) else ""
            if "/" in rest and rule.endpoint != intake.ENDPOINT:
                tenanted = {}
        self._tenanted = tenanted
        self._routes = routes
        return routes


def _routed(adapter: Any, path: str, endpoint: str, name: str) -> bool:
    """Whether Flask routes a ``POST`` to ``path`` to ``endpoint`` for source ``name``."""
    try:
        found, values = adapter.match(path, method="POST")
    except HTTPException:  # not found, another method, a redirect
        return False
    return found == endpoint and values.get("source_name") == name


def _raising(error: Exception) -> Callable[[], Any]:
    def view() -> Any:
        raise error

    return view


def _operation_headers(answer: Answer) -> tuple[str, list[tuple[str, str]]] | None:
    """The Content-Type and the other headers :func:`operations.render` would send, or
    None where Werkzeug would refuse a value (a line break) or rewrite the list (a
    Content-Length of the handler's, two of a URI header): Flask then answers."""
    content_type = "application/json"
    headers: list[tuple[str, str]] = []
    uris: set[str] = set()
    for name, value in answer.headers:
        lower = name.lower()
        if "\n" in value or "\r" in value or lower == "content-length" or lower in uris:
            return None
        if name == CONTENT_TYPE:
            content_type = value
            continue
        if lower in _URI_HEADERS:
            uris.add(lower)
            if not _PLAIN_PATH.fullmatch(value) or value.startswith("//"):
                value = iri_to_uri(value)  # a plain path is its own URI: no quoting to do
        headers.append((name, value))
    if answer.replayed:
        _set(headers, operations.REPLAYED_HEADER, "true")
    return content_type, headers


def _set(headers: list[tuple[str, str]], name: str, value: str) -> None:
    """Werkzeug's ``headers[name] = value``: the first one replaced, the others dropped."""
    lower = name.lower()
    found = [i for i, (key, _) in enumerate(headers) if key.lower() == lower]
    if not found:
        headers.append((name, value))
        return
    headers[found[0]] = (name, value)
    for i in reversed(found[1:]):
        del headers[i]


def init_app(app: Flask, receiver: intake.Receiver) -> None:
    """Put the direct path in front of Flask's dispatch (inside every other middleware)."""
    app.wsgi_app = DirectDispatch(app, app.wsgi_app, receiver)  # type: ignore[method-assign]
