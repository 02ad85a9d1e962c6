"""Hostile and broken deliveries: each gets its documented 4xx, stores nothing, harms nothing.

Every case is checked the same way: the status and stable error code, the JSON
error shape, no row in processed_events, delivery_failures or test_effects,
and a valid delivery right after it is processed. Cases where the transport
matters (lying Content-Length, chunked bodies, header limits, one client
sending many requests) run against a real gunicorn over raw sockets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from idemhook._config.events import MAX_ID_LENGTH
from idemhook._config.parsing import MAX_NESTING
from tests.conftest import SECRET, SOURCES
from tests.reliability.conftest import signed_post, truncate
from tests.servers import gunicorn

TINY_LIMIT = 512

HOSTILE_SOURCES: dict[str, Any] = {
    "plugins": SOURCES["plugins"],
    "sources": {
        **SOURCES["sources"],
        "tiny": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "max_body_bytes": TINY_LIMIT,
        },
    },
}

VALID = {"id": "evt_hostile_ok", "type": "contact.created"}


def sig(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int) -> bytes:
    return b'{"id": "deep", "type": "contact.x", "n": ' + b"[" * depth + b"]" * depth + b"}"


@dataclass(frozen=True)
class Case:
    """One hostile request to ``path``; ``signature`` None means: sign ``body`` correctly."""

    name: str
    status: int
    error: str
    body: bytes = b""
    path: str = "/webhooks/acme"
    method: str = "POST"
    content_type: str | None = "application/json"
    signature: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    unsigned: bool = False

    def request_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.content_type is not None:
            headers["Content-Type"] = self.content_type
        if not self.unsigned:
            headers["X-Signature"] = (
                self.signature if self.signature is not None else sig(self.body)
            )
        return headers


EVENT = js({"id": "evt_h", "type": "contact.updated", "email": "a@example.com"})
OTHER = js({"id": "evt_h", "type": "contact.updated", "email": "evil@example.com"})
DIGEST = hmac.new(SECRET.encode(), EVENT, hashlib.sha256)

CASES = [
    # Signatures.
    Case("bad signature", 401, "invalid_signature", EVENT, signature="sha256=" + "0" * 64),
    Case("signature of another body", 401, "invalid_signature", EVENT, signature=sig(OTHER)),
    Case(
        "signature with another secret", 401, "invalid_signature", EVENT, signature=sig(EVENT, "x")
    ),
    Case("truncated signature", 401, "invalid_signature", EVENT, signature=sig(EVENT)[:40]),
    Case(
        "signature in base64, not hex",
        401,
        "invalid_signature",
        EVENT,
        signature="sha256=" + base64.b64encode(DIGEST.digest()).decode(),
    ),
    Case("signature prefix only", 401, "invalid_signature", EVENT, signature="sha256="),
    Case("signature with non-ASCII", 401, "invalid_signature", EVENT, signature="sha256=\xe9" * 9),
    Case("missing signature header", 401, "missing_signature", EVENT, unsigned=True),
    Case("empty signature header", 401, "missing_signature", EVENT, signature=""),
    # Bodies that are not a JSON event.
    Case("empty body", 400, "invalid_json", b""),
    Case("not JSON", 400, "invalid_json", b"hello, world"),
    Case("truncated JSON", 400, "invalid_json", EVENT[:-5]),
    Case("JSON array for a single-event source", 400, "invalid_event", js([{"id": "a"}])),
    Case("JSON string", 400, "invalid_event", js("evt_1")),
    Case("JSON null", 400, "invalid_event", b"null"),
    Case("NaN literal", 400, "invalid_json", b'{"id": "n", "type": "contact.x", "v": NaN}'),
    Case(
        "number out of range", 400, "invalid_json", b'{"id": "n", "type": "contact.x", "v": 1e999}'
    ),
    Case("integer of 5000 digits", 400, "invalid_json", b'{"id": 1, "v": ' + b"9" * 5000 + b"}"),
    Case("deeply nested (100000 levels)", 400, "invalid_json", b"[" * 100_000),
    Case("nested just past the parser's comfort", 400, "invalid_json", nested(940)),
    Case("nested past the documented limit", 400, "invalid_json", nested(MAX_NESTING + 1)),
    Case("invalid UTF-8 bytes", 400, "invalid_json", b'{"id": "\xff\xfe", "type": "contact.x"}'),
    Case(
        "UTF-16 instead of UTF-8",
        400,
        "invalid_json",
        json.dumps({"id": "u16", "type": "contact.x"}).encode("utf-16"),
    ),
    Case("encoded surrogate (CESU-8)", 400, "invalid_json", b'{"id": "\xed\xa0\x80", "t": 1}'),
    # Event IDs and types.
    Case("event ID missing", 400, "missing_event_id", js({"type": "contact.x"})),
    Case("event ID null", 400, "missing_event_id", js({"id": None, "type": "contact.x"})),
    Case("event ID empty", 400, "invalid_event_id", js({"id": "", "type": "contact.x"})),
    Case(
        f"event ID of {MAX_ID_LENGTH + 1} characters",
        400,
        "invalid_event_id",
        js({"id": "x" * (MAX_ID_LENGTH + 1), "type": "contact.x"}),
    ),
    Case("event ID with NUL", 400, "invalid_event_id", js({"id": "a\x00b", "type": "contact.x"})),
    Case("event ID lone surrogate", 400, "invalid_event_id", b'{"id": "\\ud800", "type": "c.x"}'),
    Case("event ID a list", 400, "invalid_event_id", js({"id": ["a"], "type": "contact.x"})),
    Case("event ID an object", 400, "invalid_event_id", js({"id": {"a": 1}, "type": "c.x"})),
    Case("event ID a float", 400, "invalid_event_id", js({"id": 1.5, "type": "contact.x"})),
    Case("event ID a boolean", 400, "invalid_event_id", js({"id": True, "type": "contact.x"})),
    Case("event type missing", 400, "missing_event_type", js({"id": "evt_h"})),
    Case("event type with NUL", 400, "invalid_event_type", js({"id": "e", "type": "c.\x00"})),
    Case(
        "event ID header missing",
        400,
        "missing_event_id",
        EVENT,
        path="/webhooks/open",
        unsigned=True,
    ),
    Case(
        "event ID header too long",
        400,
        "invalid_event_id",
        EVENT,
        path="/webhooks/open",
        unsigned=True,
        headers={"X-Event-Id": "h" * 300},
    ),
    # Batches.
    Case("batch that is an object", 400, "invalid_batch", EVENT, path="/webhooks/batched"),
    Case("batch that is empty", 400, "invalid_batch", b"[]", path="/webhooks/batched"),
    Case(
        "batch item not an object",
        400,
        "invalid_event",
        b'[{"id": "a", "type": "t"}, 7]',
        "/webhooks/batched",
    ),
    Case(
        "batch over the source's maximum",
        400,
        "batch_too_large",
        js([{"id": f"b{i}", "type": "t"} for i in range(6)]),
        path="/webhooks/batched",
    ),
    Case(
        "batch with one bad ID stores none of it",
        400,
        "invalid_event_id",
        js([{"id": "fine", "type": "t"}, {"id": "", "type": "t"}]),
        path="/webhooks/batched",
    ),
    # Size and type.
    Case(
        "body over the limit",
        413,
        "payload_too_large",
        js({"id": "big", "pad": "x" * TINY_LIMIT}),
        path="/webhooks/tiny",
    ),
    Case("wrong content type", 415, "unsupported_media_type", EVENT, content_type="text/plain"),
    Case("no content type", 415, "unsupported_media_type", EVENT, content_type=None),
    Case(
        "form-encoded",
        415,
        "unsupported_media_type",
        b"id=evt_h",
        content_type="application/x-www-form-urlencoded",
    ),
    # Routing.
    Case("unknown source", 404, "unknown_source", EVENT, path="/webhooks/nope"),
    Case("path traversal", 404, "not_found", EVENT, path="/webhooks/../../etc/passwd"),
    Case("encoded path traversal", 404, "not_found", EVENT, path="/webhooks/..%2F..%2Fetc"),
    Case("dot-dot source", 404, "unknown_source", EVENT, path="/webhooks/%2e%2e"),
    Case("NUL in the source name", 404, "unknown_source", EVENT, path="/webhooks/acme%00"),
    Case("GET instead of POST", 405, "method_not_allowed", b"", method="GET"),
]


def assert_error(status: int, body: bytes, case: Case) -> None:
    assert status == case.status, body[:300]
    data = json.loads(body)
    assert data["error"] == case.error
    assert isinstance(data["message"], str) and data["message"]


def assert_nothing_stored(sql) -> None:
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == 0
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 0


def test_at_least_thirty_distinct_cases():
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_delivery_is_refused_and_stores_nothing(make_app, sql, case: Case):
    client = make_app(HOSTILE_SOURCES).test_client()
    answer = client.open(
        case.path, method=case.method, data=case.body, headers=case.request_headers()
    )
    assert_error(answer.status_code, answer.get_data(), case)
    assert_nothing_stored(sql)
    body = js(VALID)
    ok = client.post(
        "/webhooks/acme",
        data=body,
        headers={"Content-Type": "application/json", "X-Signature": sig(body)},
    )
    assert ok.status_code == 200 and ok.json["status"] == "processed"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "nul-deep", "type": "contact.x", "a": {"b": ["x\\u0000y"]}}',
        b'{"id": "sur-deep", "type": "contact.x", "a": {"b": ["\\udc00"]}}',
        b'{"id": "nul-key", "type": "contact.x", "a": {"k\\u0000": 1}}',
    ],
    ids=["NUL deep inside", "lone surrogate deep inside", "NUL in a key"],
)
def test_payload_that_jsonb_refuses_is_stored_faithfully_once(make_app, sql, raw):
    client = make_app(HOSTILE_SOURCES).test_client()
    headers = {"Content-Type": "application/json", "X-Signature": sig(raw)}
    first = client.post("/webhooks/acme", data=raw, headers=headers)
    assert first.status_code == 200 and first.json["status"] == "processed"
    assert client.post("/webhooks/acme", data=raw, headers=headers).json["status"] == "duplicate"
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 1
    [(payload,)] = sql("SELECT payload FROM processed_events")
    from idemhook._values.jsontext import (
        loads,
    )

    assert loads(json.dumps(payload)) == json.loads(raw)


def test_nesting_up_to_the_limit_is_accepted(make_app, sql):
    client = make_app(HOSTILE_SOURCES).test_client()
    body = nested(MAX_NESTING - 1)  # the event object plus MAX_NESTING - 1 lists
    answer = client.post(
        "/webhooks/acme",
        data=body,
        headers={"Content-Type": "application/json", "X-Signature": sig(body)},
    )
    assert answer.status_code == 200 and answer.json["status"] == "processed"
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 1


# --- Over a real server: the transport matters ------------------------------------------------


@pytest.fixture(scope="module")
def server(pg_url):
    """The shipped gunicorn settings serving the hostile-input sources."""
    with gunicorn(HOSTILE_SOURCES, pg_url) as running:
        yield running


@pytest.fixture
def fresh(server, pg_url):
    """The server, with the database emptied before and after."""
    truncate(pg_url)
    yield server
    truncate(pg_url)


def exchange(server, data: bytes, *, close_write: bool = False) -> tuple[int, bytes, bytes]:
    """Send raw bytes, read the first answer; return (status, headers, body).

    The answer ends after its Content-Length (the shipped gthread workers keep the
    connection open for the client's next request), or when the server closes.
    """
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the whole body
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while not _complete(received) and (chunk := sock.recv(65536)):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head, body


def _complete(received: bytes) -> bool:
    head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False  # no length: the answer ends when the server closes


def request_head(path: str, body_headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: localhost",
        *(f"{k}: {v}" for k, v in body_headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def still_serving(server, sql) -> None:
    assert_nothing_stored(sql)
    ok = signed_post(server.url, "acme", VALID)
    assert ok.status_code == 200 and ok.json()["status"] == "processed"


BIG = js({"id": "big", "type": "contact.x", "pad": "x" * 2 * TINY_LIMIT})

TRANSPORT: list[tuple[str, int, str, Callable[[], bytes], bool]] = [
    (
        "Content-Length over the limit, body never sent",
        413,
        "payload_too_large",
        lambda: request_head(
            "/webhooks/acme",
            {
                "Content-Type": "application/json",
                "X-Signature": sig(b"x"),
                "Content-Length": "50000000",
            },
        ),
        False,
    ),
    (
        "chunked body over the limit (no Content-Length)",
        413,
        "payload_too_large",
        lambda: (
            request_head(
                "/webhooks/tiny",
                {
                    "Content-Type": "application/json",
                    "X-Signature": sig(BIG),
                    "Transfer-Encoding": "chunked",
                },
            )
            + f"{len(BIG):x}\r\n".encode()
            + BIG
            + b"\r\n0\r\n\r\n"
        ),
        False,
    ),
    (
        "Content-Length smaller than the body (the rest is dropped)",
        401,
        "invalid_signature",
        lambda: (
            request_head(
                "/webhooks/tiny",
                {
                    "Content-Type": "application/json",
                    "X-Signature": sig(BIG),
                    "Content-Length": "100",
                },
            )
            + BIG
        ),
        False,
    ),
    (
        "Content-Length larger than the body, client hangs up",
        401,
        "invalid_signature",
        lambda: (
            request_head(
                "/webhooks/acme",
                {
                    "Content-Type": "application/json",
                    "X-Signature": sig(EVENT + b" " * 50),
                    "Content-Length": str(len(EVENT) + 50),
                },
            )
            + EVENT
        ),
        True,
    ),
    (
        "huge signature header (8000 bytes)",
        401,
        "invalid_signature",
        lambda: (
            request_head(
                "/webhooks/acme",
                {
                    "Content-Type": "application/json",
                    "X-Signature": "sha256=" + "f" * 8000,
                    "Content-Length": str(len(EVENT)),
                },
            )
            + EVENT
        ),
        False,
    ),
    (
        "huge unrelated header (8000 bytes)",
        401,
        "missing_signature",
        lambda: (
            request_head(
                "/webhooks/acme",
                {
                    "Content-Type": "application/json",
                    "X-Pad": "a" * 8000,
                    "Content-Length": str(len(EVENT)),
                },
            )
            + EVENT
        ),
        False,
    ),
]


@pytest.mark.gunicorn
@pytest.mark.parametrize(
    ("name", "status", "error", "build", "close_write"), TRANSPORT, ids=[t[0] for t in TRANSPORT]
)
def test_hostile_transport_is_refused_and_stores_nothing(
    fresh, sql, name, status, error, build, close_write
):
    got, _, body = exchange(fresh, build(), close_write=close_write)
    assert got == status, body[:300]
    assert json.loads(body)["error"] == error
    still_serving(fresh, sql)


@pytest.mark.gunicorn
@pytest.mark.parametrize(
    "extra",
    [
        {"X-Pad": "a" * 20_000},  # one field over gunicorn's 8190-byte limit
        {f"X-H{i}": "v" for i in range(150)},  # over gunicorn's 100-field limit
    ],
    ids=["header over 8190 bytes", "more than 100 headers"],
)
def test_headers_over_the_server_limits_are_refused_by_gunicorn(fresh, sql, extra):
    # gunicorn refuses these before the app runs, so the answer is its own (not JSON).
    head = request_head(
        "/webhooks/acme",
        {
            "Content-Type": "application/json",
            "X-Signature": sig(EVENT),
            **extra,
            "Content-Length": str(len(EVENT)),
        },
    )
    status, _, _ = exchange(fresh, head + EVENT)
    assert status == 431
    still_serving(fresh, sql)


@pytest.mark.gunicorn
def test_request_line_over_the_server_limit_is_refused_by_gunicorn(fresh, sql):
    head = request_head(
        "/webhooks/" + "a" * 5000,  # gunicorn's request line limit is 4094 bytes
        {"Content-Type": "application/json", "Content-Length": str(len(EVENT))},
    )
    status, _, _ = exchange(fresh, head + EVENT)
    assert status == 414
    still_serving(fresh, sql)


@pytest.mark.gunicorn
def test_garbage_instead_of_http_is_refused(fresh, sql):
    status, _, _ = exchange(fresh, b"\x16\x03\x01\x02\x00\x01garbage\r\n\r\n")
    assert status == 400
    still_serving(fresh, sql)


@pytest.mark.gunicorn
def test_many_small_requests_from_one_client(fresh, sql):
    # One client hammering with forged deliveries: every one answered, none stored.
    with requests.Session() as session:
        answers = [
            session.post(
                f"{fresh.url}/webhooks/acme",
                data=js({"id": f"spam-{i}", "type": "contact.x"}),
                headers={"Content-Type": "application/json", "X-Signature": "sha256=" + "0" * 64},
                timeout=30,
            )
            for i in range(300)
        ]
    assert {(a.status_code, a.json()["error"]) for a in answers} == {(401, "invalid_signature")}
    # Pipelined requests on one connection: the first is answered, nothing is stored.
    pipelined = b"".join(
        request_head(
            "/webhooks/acme",
            {
                "Content-Type": "application/json",
                "X-Signature": "sha256=00",
                "Content-Length": str(len(EVENT)),
            },
        )
        + EVENT
        for _ in range(50)
    )
    status, _, _ = exchange(fresh, pipelined)
    assert status == 401
    still_serving(fresh, sql)


# Stripe: the timestamp is signed, so replays and stale deliveries are refused even with
# a signature that once was valid.
STRIPE_SECRET = "whsec_hostile_test"
STRIPE_SOURCES: dict[str, Any] = {
    "plugins": ["tests.plugins.recorder"],
    "sources": {
        **SOURCES["sources"],
        "billing": {"scheme": "stripe", "secret": STRIPE_SECRET},
    },
}
STRIPE_EVENT = js({"id": "evt_stripe_1", "type": "invoice.paid"})


def stripe_v1(body: bytes, t: int | str) -> str:
    signed = str(t).encode() + b"." + body
    return hmac.new(STRIPE_SECRET.encode(), signed, hashlib.sha256).hexdigest()


def now() -> int:
    return int(time.time())


STRIPE_CASES = [
    # (name, body, header builder, status, error)
    (
        "stale t",
        STRIPE_EVENT,
        lambda b: f"t={now() - 301},v1={stripe_v1(b, now() - 301)}",
        401,
        "stale_timestamp",
    ),
    (
        "future t",
        STRIPE_EVENT,
        lambda b: f"t={now() + 301},v1={stripe_v1(b, now() + 301)}",
        401,
        "stale_timestamp",
    ),
    (
        "header replayed with a new body",
        js({"id": "evt_stripe_1", "type": "invoice.paid", "amount": 1}),
        lambda b: f"t={now()},v1={stripe_v1(STRIPE_EVENT, now())}",
        401,
        "invalid_signature",
    ),
    (
        "only v0",
        STRIPE_EVENT,
        lambda b: f"t={now()},v0={stripe_v1(b, now())}",
        401,
        "invalid_signature",
    ),
    ("no t", STRIPE_EVENT, lambda b: f"v1={stripe_v1(b, now())}", 401, "invalid_signature"),
    (
        "t not a number",
        STRIPE_EVENT,
        lambda b: f"t=soon,v1={stripe_v1(b, 'soon')}",
        401,
        "invalid_signature",
    ),
    ("malformed header", STRIPE_EVENT, lambda b: "garbage", 401, "invalid_signature"),
    ("empty header", STRIPE_EVENT, lambda b: "", 401, "missing_signature"),
]


@pytest.mark.parametrize(
    ("body", "header", "status", "error"),
    [case[1:] for case in STRIPE_CASES],
    ids=[case[0] for case in STRIPE_CASES],
)
def test_hostile_stripe_delivery_is_refused(make_app, sql, body, header, status, error):
    client = make_app(STRIPE_SOURCES).test_client()
    headers = {"Content-Type": "application/json", "Stripe-Signature": header(body)}
    answer = client.post("/webhooks/billing", data=body, headers=headers)
    assert answer.status_code == status and answer.json["error"] == error
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0


def test_stripe_bad_v1_beside_a_good_one_passes(make_app, sql):
    client = make_app(STRIPE_SOURCES).test_client()
    t = now()
    header = f"t={t},v1={'0' * 64},v1={stripe_v1(STRIPE_EVENT, t)}"
    answer = client.post(
        "/webhooks/billing",
        data=STRIPE_EVENT,
        headers={"Content-Type": "application/json", "Stripe-Signature": header},
    )
    assert answer.status_code == 200 and answer.json["status"] == "ignored"


def test_stale_redelivery_of_a_processed_stripe_event_is_refused_not_a_duplicate(make_app, sql):
    client = make_app(STRIPE_SOURCES).test_client()
    t = now()
    fresh = f"t={t},v1={stripe_v1(STRIPE_EVENT, t)}"
    headers = {"Content-Type": "application/json", "Stripe-Signature": fresh}
    assert client.post("/webhooks/billing", data=STRIPE_EVENT, headers=headers).status_code == 200
    old = t - 3600
    headers["Stripe-Signature"] = f"t={old},v1={stripe_v1(STRIPE_EVENT, old)}"
    replay = client.post("/webhooks/billing", data=STRIPE_EVENT, headers=headers)
    assert replay.status_code == 401 and replay.json["error"] == "stale_timestamp"
    assert sql("SELECT duplicate_count FROM processed_events")[0][0] == 0
