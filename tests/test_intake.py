"""Every error status of POST /webhooks/<source>: JSON error code, nothing stored."""

from __future__ import annotations

import io
import json

import pytest

from idemhook import create_app
from idemhook.testing import deliver, signed

VALID = {"id": "evt_ok", "type": "contact.updated"}


@pytest.fixture
def nothing_stored(sql):
    """Assert after the test that neither a claim nor a failure nor an effect was stored."""
    yield
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == 0
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 0


def post(client, source, body: bytes, headers: dict):
    return client.post(f"/webhooks/{source}", data=body, headers=headers)


def signed_post(client, body: bytes, *, source="acme", **extra_headers):
    _, body, headers = signed(client.application, source, body)
    headers.update(extra_headers)
    return post(client, source, body, headers)


def big_id(n):
    return json.dumps({"id": "x" * n, "type": "contact.updated"}).encode()


CASES = [
    # (name, body, status, error code)
    ("empty body", b"", 400, "invalid_json"),
    ("not json", b"hello", 400, "invalid_json"),
    ("not utf-8", b'{"id": "\xff\xfe"}', 400, "invalid_json"),
    ("NaN is not JSON", b'{"id": "a", "type": "t", "n": NaN}', 400, "invalid_json"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("array for a single-event source", b"[1, 2]", 400, "invalid_event"),
    ("missing event id", b'{"type": "contact.updated"}', 400, "missing_event_id"),
    ("null event id", b'{"id": null, "type": "t"}', 400, "missing_event_id"),
    ("empty event id", b'{"id": "", "type": "t"}', 400, "invalid_event_id"),
    ("object event id", b'{"id": {"a": 1}, "type": "t"}', 400, "invalid_event_id"),
    ("float event id", b'{"id": 1.5, "type": "t"}', 400, "invalid_event_id"),
    ("event id of 256 chars", big_id(256), 400, "invalid_event_id"),
    ("event id with NUL", b'{"id": "a\\u0000b", "type": "t"}', 400, "invalid_event_id"),
    ("event id lone surrogate", b'{"id": "\\ud800", "type": "t"}', 400, "invalid_event_id"),
    ("missing event type", b'{"id": "a"}', 400, "missing_event_type"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_body_is_refused_with_its_code(client, nothing_stored, body, status, code):
    response = signed_post(client, body)
    assert response.status_code == status
    assert response.json["error"] == code
    assert response.json["message"]


def test_event_id_of_255_chars_is_accepted(client, sql):
    assert signed_post(client, big_id(255)).status_code == 200


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[]", "invalid_batch"),
        (b'{"id": "a"}', "invalid_batch"),
        (json.dumps([{"id": str(i), "type": "t"} for i in range(6)]).encode(), "batch_too_large"),
        (b'[{"id": "a", "type": "t"}, 7]', "invalid_event"),
        (b'[{"id": "a", "type": "t"}, {"type": "t"}]', "missing_event_id"),
    ],
    ids=["empty", "object", "over max_batch", "non-object element", "element without id"],
)
def test_bad_batch_stores_none_of_its_events(client, nothing_stored, body, code):
    response = signed_post(client, body, source="batched")
    assert response.status_code == 400
    assert response.json["error"] == code


def test_bad_signature_is_401(client, nothing_stored):
    _, body, headers = signed(client.application, "acme", VALID)
    headers["X-Signature"] = "sha256=" + "0" * 64
    response = post(client, "acme", body, headers)
    assert response.status_code == 401
    assert response.json["error"] == "invalid_signature"


def test_signature_of_another_body_is_401(client, nothing_stored):
    _, _, headers = signed(client.application, "acme", {"id": "other", "type": "t"})
    response = post(client, "acme", json.dumps(VALID).encode(), headers)
    assert response.status_code == 401 and response.json["error"] == "invalid_signature"


def test_missing_signature_is_401(client, nothing_stored):
    response = client.post("/webhooks/acme", json=VALID)
    assert response.status_code == 401
    assert response.json["error"] == "missing_signature"
    assert "X-Signature" in response.json["message"]


def test_signature_with_a_rotated_secret_verifies(make_app, sql):
    config = {
        "sources": {
            "acme": {"scheme": "hmac-sha256", "secret": ["new", "old"], "event_id": "body:id"}
        }
    }
    old = make_app({"sources": {"acme": {**config["sources"]["acme"], "secret": "old"}}})
    _, body, headers = signed(old, "acme", VALID)
    rotated = make_app(config).test_client()
    assert post(rotated, "acme", body, headers).status_code == 200


def test_unknown_source_is_404(client, nothing_stored):
    response = client.post("/webhooks/nobody", json=VALID)
    assert response.status_code == 404
    assert response.json["error"] == "unknown_source"


def test_path_traversal_in_source_is_404(client, nothing_stored):
    response = client.post("/webhooks/..%2F..%2Fetc", json=VALID)
    assert response.status_code == 404
    assert response.json["error"] in ("unknown_source", "not_found")


def test_wrong_method_is_405_json(client, nothing_stored):
    response = client.get("/webhooks/acme")
    assert response.status_code == 405
    assert response.json["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_body_over_the_limit_is_413(make_app, sql, nothing_stored):
    client = make_app(IDEMHOOK_MAX_BODY_BYTES=100).test_client()
    body = json.dumps({**VALID, "pad": "x" * 200}).encode()
    response = signed_post(client, body)
    assert response.status_code == 413
    assert response.json["error"] == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(make_app, sql, nothing_stored):
    client = make_app(IDEMHOOK_MAX_BODY_BYTES=100).test_client()
    body = json.dumps({**VALID, "pad": "x" * 200}).encode()
    _, body, headers = signed(client.application, "acme", body)
    # No Content-Length (chunked, as gunicorn delivers it): reading must stop at the limit.
    response = client.post(
        "/webhooks/acme",
        input_stream=io.BytesIO(body),
        headers={**headers, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert response.json["error"] == "payload_too_large"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_wrong_content_type_is_415(client, nothing_stored, content_type):
    _, body, headers = signed(client.application, "acme", VALID)
    headers["Content-Type"] = content_type
    response = post(client, "acme", body, headers)
    assert response.status_code == 415
    assert response.json["error"] == "unsupported_media_type"


def test_json_with_charset_is_accepted(client):
    response = deliver(client, "acme", VALID, {"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200


def test_database_unavailable_is_503_and_nothing_answers_2xx(db_url):
    dead = db_url.set(host="127.0.0.1", port=1)  # nothing listens on port 1
    from tests.conftest import SOURCES

    client = create_app({"DATABASE_URL": dead, "IDEMHOOK_CONFIG": SOURCES}).test_client()
    response = deliver(client, "acme", VALID)
    assert response.status_code == 503
    assert response.json["error"] == "database_unavailable"
    assert response.headers["Retry-After"]


def test_server_keeps_serving_after_errors(client):
    for body in (b"", b"nope", b"[1]"):
        signed_post(client, body)
    assert deliver(client, "acme", VALID).json["status"] == "processed"
