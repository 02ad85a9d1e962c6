"""The direct path (``idemhook._web.direct``) answers as Flask's dispatch would.

Each kind of request (webhook deliveries, API requests with an Idempotency-Key, and
their refusals and failures) goes to two apps on one database: one as shipped, whose
senders' requests skip Flask's per-request machinery, and one with a plugin's
``before_request`` hook, which Flask must run and so dispatches everything. Status,
headers, body and what the database holds afterwards must be the same; the tables are
emptied between the two.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
from collections.abc import Callable
from typing import Any

import flask
import pytest
from flask import Flask, signals
from hypothesis import given, settings
from hypothesis import strategies as st

from idemhook._engine.keys import Answer
from idemhook._web import direct, operations
from idemhook.testing import deliver, signed
from tests.conftest import SECRET, SOURCES, _clean
from tests.test_operations import API_SOURCES

CONFIG = {
    "plugins": SOURCES["plugins"] + API_SOURCES["plugins"],
    "sources": {
        **SOURCES["sources"],
        **API_SOURCES["sources"],
        "later": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "event_type": "body:type",
            "mode": "async",
        },
    },
}
#: What a delivery leaves in the database, in an order that does not depend on IDs.
STORED = (
    "SELECT source, event_id, event_type, status, result::text, duplicate_count, tenant, "
    "response_status, fingerprint FROM processed_events ORDER BY source, event_id",
    "SELECT source, event_id FROM test_effects ORDER BY source, event_id",
    "SELECT source, error, status_code, tenant, body_bytes, body_sha256, headers::text, count "
    "FROM rejected_deliveries ORDER BY source, error",
    "SELECT q.source, e.event_id FROM event_queue q JOIN processed_events e ON e.id = q.id "
    "ORDER BY e.event_id",
)


def send(
    client: Any, path: str, document: Any = None, *, raw: bytes | None = None, **headers: str
) -> Any:
    body = raw if raw is not None else json.dumps(document).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    sent = {"Content-Type": "application/json", "X-Signature": signature, **headers}
    return client.post(path, data=body, headers=sent)


EVENT = {"id": "evt_1", "type": "contact.updated"}


def new_event(client):
    return send(client, "/webhooks/acme", EVENT)


def duplicate(client):
    send(client, "/webhooks/acme", EVENT)
    return send(client, "/webhooks/acme", EVENT)


def unhandled_type(client):
    return send(client, "/webhooks/acme", {"id": "evt_2", "type": "deal.created"})


def batch(client):
    return send(client, "/webhooks/batched", [{"id": f"b{i}", "type": "x"} for i in range(3)])


def failing_event(client, sql):
    sql("INSERT INTO test_failures (event_id, reason) VALUES ('evt_bad', 'boom')")
    return send(client, "/webhooks/acme", {"id": "evt_bad", "type": "contact.updated"})


def batch_with_a_failure(client, sql):
    sql("INSERT INTO test_failures (event_id, reason) VALUES ('b1', 'boom')")
    return batch(client)


def forged(client):
    body = json.dumps(EVENT).encode()
    return client.post(
        "/webhooks/acme",
        data=body,
        headers={"Content-Type": "application/json", "X-Signature": "sha256=" + "0" * 64},
    )


def wrong_type(client):
    return send(client, "/webhooks/acme", EVENT, **{"Content-Type": "text/plain"})


def too_large(client):
    return send(client, "/webhooks/acme", raw=b'{"id": "' + b"x" * 2_000_000 + b'"}')


def not_json(client):
    return send(client, "/webhooks/acme", raw=b"{not json")


def no_event_id(client):
    return send(client, "/webhooks/acme", {"type": "contact.updated"})


def unknown_tenant(client):
    return send(client, "/webhooks/acme/someone", EVENT)


def unverified_open_source(client):
    headers = {"Content-Type": "application/json", "X-Event-Id": "o1"}
    return client.post("/webhooks/open", data=b"{}", headers=headers)


def asynchronous(client):
    return send(client, "/webhooks/later", {"id": "a1", "type": "contact.updated"})


def unknown_source(client):
    return send(client, "/webhooks/nowhere", EVENT)


def api_new(client):
    return deliver(client, "emails", {"to": "a@example.com"}, as_client="acme", key="k-1")


def api_replay(client):
    api_new(client)
    return api_new(client)


def api_at_its_webhooks_path(client):
    url, body, headers = signed(client.application, "charges", {"amount": 1}, key="w-1")
    return client.post("/webhooks/charges", data=body, headers=headers)


def api_declined(client):
    return deliver(client, "charges", {"amount": 1, "decline": True}, key="d-1")


def api_plain_value(client):
    return deliver(client, "charges", {"plain": ["a", 1]}, key="p-1")


def api_key_reused_for_another_body(client):
    deliver(client, "charges", {"amount": 1}, key="m-1")
    return deliver(client, "charges", {"amount": 2}, key="m-1")


def api_without_a_key(client):
    url, body, headers = signed(client.application, "emails", {"to": "x"}, client="acme", key="x")
    del headers["Idempotency-Key"]
    return client.post(url, data=body, headers=headers)


def api_bad_token(client):
    return client.post(
        "/v1/emails",
        json={"to": "x"},
        headers={"Authorization": "Bearer wrong-token-0123456789", "Idempotency-Key": "b-1"},
    )


def api_failing_operation(client):
    return deliver(client, "charges", {"fail": "boom"}, key="f-1")


def api_rejected(client):
    return deliver(client, "charges", {"reject": "no such card"}, key="r-1")


def api_not_an_object(client):
    return deliver(client, "charges", ["a list"], key="l-1")


#: Each case: how it is sent, and the status it is answered with.
CASES: dict[str, tuple[Callable[..., Any], int]] = {
    "API: new key": (api_new, 201),
    "API: replay": (api_replay, 201),
    "API: at /webhooks/<name>": (api_at_its_webhooks_path, 201),
    "API: 402": (api_declined, 402),
    "API: plain value": (api_plain_value, 200),
    "API: key reused": (api_key_reused_for_another_body, 422),
    "API: no key": (api_without_a_key, 400),
    "API: wrong token": (api_bad_token, 401),
    "API: failing operation": (api_failing_operation, 500),
    "API: rejected": (api_rejected, 422),
    "API: not an object": (api_not_an_object, 400),
    "new event": (new_event, 200),
    "duplicate": (duplicate, 200),
    "no handler for its type": (unhandled_type, 200),
    "batch": (batch, 200),
    "failing handler": (failing_event, 500),
    "batch with a failing event": (batch_with_a_failure, 500),
    "forged signature": (forged, 401),
    "content type": (wrong_type, 415),
    "body too large": (too_large, 413),
    "not JSON": (not_json, 400),
    "no event ID": (no_event_id, 400),
    "unknown tenant": (unknown_tenant, 404),
    "unverified source": (unverified_open_source, 200),
    "asynchronous source": (asynchronous, 202),
    "unknown source": (unknown_source, 404),
}


def counting_fallback(app: Flask) -> list[str]:
    """The paths the direct path handed to Flask's dispatch, as they happen."""
    direct = app.wsgi_app
    while type(direct).__name__ != "DirectDispatch":
        direct = direct.wsgi_app
    handed: list[str] = []
    flask_dispatch = direct.wsgi_app

    def dispatch(environ, start_response):
        handed.append(environ["PATH_INFO"])
        return flask_dispatch(environ, start_response)

    direct.wsgi_app = dispatch
    return handed


def answer_and_store(app: Flask, case: str, sql, db_url: str) -> tuple:
    """Run one of CASES on ``app``: its answer (status, headers, body) and every row it left
    (STORED), then empty the tables for the next app."""
    run, _status = CASES[case]
    client = app.test_client()
    response = run(client, sql) if len(inspect.signature(run).parameters) == 2 else run(client)
    app.extensions["idemhook.matches"].close()  # which secret verified: written before reading
    stored = [sql(query) for query in STORED]
    _clean(db_url)
    sql("DELETE FROM test_failures")
    return response.status, dict(response.headers), response.get_data(), stored


@pytest.mark.parametrize("case", CASES)
def test_a_delivery_is_answered_and_stored_alike_on_both_paths(make_app, sql, db_url, case):
    status = CASES[case][1]
    seen = []
    for hooked in (False, True):
        app = make_app(CONFIG)
        if hooked:
            app.before_request(lambda: None)  # a plugin's hook: Flask must dispatch
        handed = counting_fallback(app)
        seen.append(answer_and_store(app, case, sql, db_url))
        if hooked or case == "unknown source":
            assert handed, "the delivery should have gone through Flask"
        else:
            assert not handed, f"Flask dispatched {handed}"
    direct, flask = seen
    assert int(direct[0][:3]) == status
    assert direct == flask


def test_a_signal_receiver_or_debug_mode_sends_deliveries_through_flask(make_app):
    app = make_app(CONFIG)
    handed = counting_fallback(app)
    client = app.test_client()
    seen: list[str] = []

    def started(sender, **extra):
        seen.append("started")

    with signals.request_started.connected_to(started, app):
        assert new_event(client).status_code == 200
    assert seen == ["started"] and handed == ["/webhooks/acme"]
    app.debug = True
    assert send(client, "/webhooks/acme", {"id": "evt_9", "type": "x"}).status_code == 200
    assert handed == ["/webhooks/acme"] * 2
    app.debug = False
    assert send(client, "/webhooks/acme", {"id": "evt_10", "type": "x"}).status_code == 200
    assert len(handed) == 2


def test_an_app_that_checks_the_host_header_sends_deliveries_through_flask(make_app):
    """With Flask's TRUSTED_HOSTS set, a delivery to another Host is refused as Flask refuses
    it (400), not answered by the direct path."""
    app = make_app(CONFIG, TRUSTED_HOSTS=["hooks.example.com"])
    handed = counting_fallback(app)
    client = app.test_client()
    other = send(client, "/webhooks/acme", EVENT, Host="attacker.example")
    assert other.status_code == 400 and handed == ["/webhooks/acme"]
    trusted = send(client, "/webhooks/acme", EVENT, Host="hooks.example.com")
    assert trusted.status_code == 200 and trusted.json["status"] == "processed"


def test_a_path_a_plugin_routes_goes_through_flask(make_app, tmp_path, monkeypatch):
    """A plugin's blueprint that serves POST /webhooks/acme/special takes every tenant's path
    from the direct path (Flask's routing decides), and /webhooks/acme stays direct."""
    app = make_app(CONFIG)
    from flask import Blueprint

    extra = Blueprint("extra", __name__)
    extra.add_url_rule("/webhooks/acme/special", "special", lambda: "special", methods=["POST"])
    app.register_blueprint(extra)
    handed = counting_fallback(app)
    client = app.test_client()
    assert client.post("/webhooks/acme/special").get_data() == b"special"
    assert new_event(client).status_code == 200
    assert handed == ["/webhooks/acme/special"]


LOCATIONS = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40).filter(
    lambda v: "\n" not in v and "\r" not in v
)


def test_an_operations_headers_are_what_werkzeug_would_send(make_app):
    """The direct path writes an operation's headers itself: the same list Werkzeug sends
    for Flask's response, whatever the handler's ``Location`` (quoted as an IRI alike)."""
    app = make_app(CONFIG)

    def same(location: str, replayed: bool) -> None:
        headers_in = (("Location", location), ("X-Operation", "made"))
        answer = Answer(201, {"id": 1}, headers_in, replayed)
        content_type, headers = direct._operation_headers(answer)
        with app.test_request_context("/v1/emails", method="POST"):
            response = operations.render(answer)
            sent = list(response.get_wsgi_headers(flask.request.environ).items())
        body = (app.json.dumps({"id": 1}, separators=(",", ":")) + "\n").encode()
        expected = [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers]
        assert sorted(sent) == sorted(expected)

    same("/v1/emails/1", False)  # a plain path: the direct path skips the quoting
    same("/v1/é mails?a=b c#f", True)  # one that Werkzeug quotes
    settings(max_examples=300, deadline=None)(
        given(location=LOCATIONS, replayed=st.booleans())(same)
    )()
