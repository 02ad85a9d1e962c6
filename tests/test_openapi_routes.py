"""openapi.yaml stays in step with the routes, and real responses match its schemas."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from idemhook import create_app
from idemhook.testing import deliver, signed
from tests.conftest import SOURCES
from tests.reliability.conftest import wait_for
from tests.test_api import AUTH, TOKEN
from tests.test_events_cli import closed_port
from tests.test_operations import API_SOURCES

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
IMPLICIT = {"HEAD", "OPTIONS"}


def _deref(node: Any) -> Any:
    """Inline every local ``$ref`` (the spec has no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = SPEC
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _deref(copy.deepcopy(target))
        return {key: _deref(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_deref(item) for item in node]
    return node


def _shape(path: str) -> str:
    """A Flask rule or an OpenAPI path with its parameter names blanked: /events/{}/{}."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def conforms(response: Any, path: str, method: str = "get") -> None:
    """Assert that ``response`` is documented for ``path`` and matches its schema."""
    documented = SPEC["paths"][path][method]["responses"]
    status = str(response.status_code)
    if status not in documented:  # a range: an API's operation chooses its own status
        status = f"{status[0]}XX"
    assert status in documented, f"{method.upper()} {path} answered undocumented {status}"
    spec = _deref(documented[status])
    content = spec["content"]
    mimetype = response.mimetype
    assert mimetype in content, f"{path} {status}: {mimetype} not documented"
    for header in spec.get("headers", {}):
        if status.endswith("XX"):
            continue  # the operation's own headers (Location, Idempotent-Replayed) vary
        assert header in response.headers, f"{path} {status}: missing header {header}"
    if mimetype in ("application/json", "application/problem+json"):
        OAS30Validator(content[mimetype]["schema"]).validate(response.json)


def test_spec_is_valid_openapi():
    validate(SPEC)


#: The test sources plus the test APIs (idempotency-key), one at the spec's example path;
#: the others' paths are documented by it too (one shape, /v1/{}).
API_FORM = {
    "plugins": [*SOURCES["plugins"], *API_SOURCES["plugins"]],
    "sources": {**SOURCES["sources"], **API_SOURCES["sources"]},
}


#: The email-send API example (examples/email_api), whose plugin route the spec documents.
EXAMPLE = {
    "plugins": ["examples.email_api.handlers"],
    "sources": {
        "emails": {
            "scheme": "idempotency-key",
            "auth": "bearer",
            "path": "/v1/emails",
            "secret": "email-example-token-0123",
        }
    },
}


def test_every_route_is_documented_and_every_documented_path_is_routed(make_app):
    apps = [make_app(API_FORM, IDEMHOOK_ADMIN_TOKEN=TOKEN), make_app(EXAMPLE)]
    # An API source's routes are static rules: /webhooks/<its name>, and its path, which
    # the spec documents once by its example, /v1/emails.
    documented_as = {"operations.receive": "/webhooks/{}", "operations.receive_path": "/v1/emails"}
    routed = {
        (documented_as.get(rule.endpoint) or _shape(rule.rule), method.lower())
        for app in apps
        for rule in app.url_map.iter_rules()
        # The dashboard's HTML pages are for people, not API clients: docs/dashboard.md
        # lists them (tests/dashboard/test_docs.py keeps that list in step).
        if rule.endpoint != "static" and not rule.endpoint.startswith("dashboard.")
        for method in rule.methods - IMPLICIT
    }
    documented = {(_shape(path), method) for path, ops in SPEC["paths"].items() for method in ops}
    assert routed == documented


def test_intake_responses_match_the_spec(client, sql):
    path = "/webhooks/{source}"
    conforms(deliver(client, "acme", {"id": "o1", "type": "contact.updated"}), path, "post")
    conforms(deliver(client, "acme", {"id": "o1", "type": "contact.updated"}), path, "post")
    conforms(deliver(client, "acme", {"id": "o2", "type": "invoice.paid"}), path, "post")
    conforms(deliver(client, "batched", [{"id": "b1", "type": "x"}]), path, "post")
    conforms(deliver(client, "acme", b"not json"), path, "post")
    conforms(deliver(client, "acme", {"type": "x"}), path, "post")
    conforms(client.post("/webhooks/acme", json={"id": "x"}), path, "post")  # unsigned: 401
    conforms(client.post("/webhooks/nope", json={}), path, "post")
    conforms(client.get("/webhooks/acme"), path, "post")  # 405 documented on the path
    conforms(client.post("/webhooks/acme", data=b"x" * (2 * 1024 * 1024)), path, "post")
    conforms(client.post("/webhooks/acme", data=b"{}", content_type="text/plain"), path, "post")
    sql("INSERT INTO test_failures VALUES ('f1', 'down'), ('f2', 'down')")
    conforms(deliver(client, "acme", {"id": "f1", "type": "contact.updated"}), path, "post")
    batch = [{"id": "f2", "type": "x"}, {"id": "f3", "type": "x"}]
    conforms(deliver(client, "batched", batch), path, "post")


def test_intake_unavailable_matches_the_spec(db_url):
    url = db_url.set(host="127.0.0.1", port=closed_port())
    app = create_app(
        {"DATABASE_URL": url, "IDEMHOOK_CONFIG": SOURCES, "IDEMHOOK_ADMIN_TOKEN": TOKEN}
    )
    client = app.test_client()
    response = deliver(client, "acme", {"id": "u1", "type": "contact.updated"})
    assert response.status_code == 503
    conforms(response, "/webhooks/{source}", "post")
    conforms(client.get("/readyz"), "/readyz")
    for url_, path in [
        ("/events", "/events"),
        ("/events/stats", "/events/stats"),
        ("/events/a/b", "/events/{source}/{event_id}"),
        ("/failures", "/failures"),
    ]:
        answer = client.get(url_, headers=AUTH)
        assert answer.status_code == 503 and answer.json["error"] == "database_unavailable"
        conforms(answer, path)


@pytest.fixture
def api(make_app, sql):
    """A client of an app with the read API on, and a few events and failures."""
    client = make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN).test_client()
    deliver(client, "acme", {"id": "r1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "r1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "r2", "type": None})  # not a string: 400, nothing stored
    deliver(client, "open", {"n": 1}, {"X-Event-Id": "r3"})
    sql("INSERT INTO test_failures VALUES ('r4', 'down')")
    deliver(client, "acme", {"id": "r4", "type": "contact.updated"})
    return client


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("/events", "/events"),
        ("/events?limit=1", "/events"),
        ("/events?source=open&since=1h&until=2100-01-01T00:00Z", "/events"),
        ("/events?limit=0", "/events"),
        ("/events?cursor=zzz", "/events"),
        ("/events/stats", "/events/stats"),
        ("/events/stats?by=hour&since=1d", "/events/stats"),
        ("/events/stats?by=source", "/events/stats"),
        ("/events/stats?by=x", "/events/stats"),
        ("/events/acme/r1", "/events/{source}/{event_id}"),
        ("/events/acme/missing", "/events/{source}/{event_id}"),
        ("/events/acme/r1?x=1", "/events/{source}/{event_id}"),
        ("/failures", "/failures"),
        ("/failures?pending=true&limit=1", "/failures"),
        ("/failures?pending=perhaps", "/failures"),
        ("/reconcile", "/reconcile"),
        ("/reconcile/runs", "/reconcile/runs"),
        ("/reconcile/runs?source=acme&limit=1", "/reconcile/runs"),
        ("/reconcile/runs?cursor=zzz", "/reconcile/runs"),
        ("/metrics", "/metrics"),
        ("/healthz", "/healthz"),
        ("/readyz", "/readyz"),
    ],
)
def test_read_and_operate_responses_match_the_spec(api, url, path):
    response = api.get(url, headers=AUTH)
    conforms(response, path)
    unauthenticated = api.get(url)
    if path.startswith(("/events", "/failures", "/reconcile")):
        assert unauthenticated.status_code == 401
    conforms(unauthenticated, path)
    conforms(api.post(url, headers=AUTH), path)  # 405


def test_event_detail_with_failures_and_disabled_api_match_the_spec(make_app, sql):
    client = make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN).test_client()
    sql("INSERT INTO test_failures VALUES ('d1', 'down')")
    deliver(client, "acme", {"id": "d1", "type": "contact.updated"})
    sql("DELETE FROM test_failures")
    deliver(client, "acme", {"id": "d1", "type": "contact.updated"})
    detail = client.get("/events/acme/d1", headers=AUTH)
    assert len(detail.json["failures"]) == 1
    conforms(detail, "/events/{source}/{event_id}")

    off = make_app(IDEMHOOK_METRICS_PUBLIC=False).test_client()
    for url, path in [
        ("/events", "/events"),
        ("/events/stats", "/events/stats"),
        ("/events/a/b", "/events/{source}/{event_id}"),
        ("/failures", "/failures"),
        ("/metrics", "/metrics"),
    ]:
        response = off.get(url, headers=AUTH)
        assert response.status_code == 404
        conforms(response, path)


def test_api_form_responses_match_the_spec(make_app, sql):
    client = make_app(API_FORM, IDEMHOOK_HANDLER_TIMEOUT_MS=300).test_client()
    path = "/v1/emails"
    created = deliver(client, "emails", {"to": "a"}, as_client="acme", key="s-1")
    assert created.status_code == 201
    conforms(created, path, "post")
    conforms(deliver(client, "emails", {"to": "a"}, as_client="acme", key="s-1"), path, "post")
    declined = deliver(client, "emails", {"decline": True}, as_client="acme", key="s-2")
    assert declined.status_code == 402
    conforms(declined, path, "post")
    conforms(deliver(client, "emails", {"to": "b"}, as_client="acme", key="s-1"), path, "post")
    conforms(deliver(client, "emails", {"reject": "no"}, as_client="acme", key="s-3"), path, "post")
    conforms(deliver(client, "emails", {"fail": "x"}, as_client="acme", key="s-4"), path, "post")
    conforms(deliver(client, "emails", {"to": "c"}, as_client="acme", key=""), path, "post")
    conforms(client.post(path, json={"to": "d"}), path, "post")  # no credentials: 401
    conforms(client.post(path, data=b"x" * (2 * 1024 * 1024)), path, "post")
    conforms(client.post(path, data=b"{}", content_type="text/plain"), path, "post")
    conforms(client.get(path), path, "post")  # 405
    slow = deliver(client, "emails", {"sleep": 0.6}, as_client="acme", key="s-5")
    assert slow.status_code == 503
    conforms(slow, path, "post")
    busy = deliver(client, "emails", {"sleep": 0.6}, as_client="acme", key="s-5")
    assert busy.status_code == 409
    conforms(busy, path, "post")
    wait_for(lambda: not sql("SELECT 1 FROM processed_events WHERE status = 'in_flight'"), "s-5")
    # The same source at /webhooks/<source>: its answers are documented there too.
    url, body, headers = signed(client.application, "emails", {"to": "a"}, client="acme", key="s-1")
    replay = client.post("/webhooks/emails", data=body, headers=headers)
    assert replay.status_code == 422  # another path: another request
    conforms(replay, "/webhooks/{source}", "post")
