"""idempotency-key sources as APIs: the operation's answer, replayed; errors as problem details.

Through the Flask test client on the real PostgreSQL; the concurrency and expiry races
run against a real gunicorn in tests/test_operations_concurrency.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest

from idemhook import create_app
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver, signed
from idemhook.testing.postgres import connect_args
from tests.reliability.conftest import wait_for
from tests.test_events_cli import closed_port

SECRET = "charges-signing-secret"
UUID = "8e03978e-40d5-43e8-bc93-6894a57f9324"
TOKENS = {"acme": "acme-token-0123456789", "globex": "globex-token-0123456789"}

API_SOURCES = {
    "plugins": ["tests.plugins.operations"],
    "sources": {
        # Bearer tokens name the client.
        "emails": {
            "scheme": "idempotency-key",
            "auth": "bearer",
            "path": "/v1/emails",
            "clients": dict(TOKENS),
        },
        # HMAC, one anonymous client (secret alone).
        "charges": {"scheme": "idempotency-key", "secret": SECRET, "path": "/v1/charges"},
        # HMAC with named clients: X-Client names the client, its secret signs.
        "orders": {
            "scheme": "idempotency-key",
            "clients": {"acme": "acme-order-secret-0123", "globex": "globex-order-secret-01"},
        },
    },
}


@pytest.fixture
def api(make_app):
    """A test client of the receiver with the test APIs."""
    return make_app(API_SOURCES).test_client()


def effects(sql, source: str) -> list[str]:
    rows = sql("SELECT event_id FROM test_effects WHERE source = :s ORDER BY 1", s=source)
    return [row.event_id for row in rows]


def allowlisted(response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k in ("Location", "X-Operation")}


def test_a_retry_gets_the_original_status_body_and_headers_marked_replayed(api, sql):
    first = deliver(api, "emails", {"to": "a@example.com"}, as_client="acme", key="k-1")
    assert first.status_code == 201
    assert first.json == {"id": 1, "client": "acme", "to": "a@example.com"}
    assert first.headers["Location"] == "/v1/emails/1"
    assert "Idempotent-Replayed" not in first.headers
    for _ in range(2):
        again = deliver(api, "emails", {"to": "a@example.com"}, as_client="acme", key="k-1")
        assert again.status_code == 201
        assert again.get_data() == first.get_data()
        assert allowlisted(again) == allowlisted(first) == {
            "Location": "/v1/emails/1",
            "X-Operation": "created",
        }
        assert again.headers["Idempotent-Replayed"] == "true"
    assert effects(sql, "emails") == ["acme:k-1"]
    [row] = sql("SELECT * FROM processed_events WHERE source = 'emails'")
    assert (row.event_id, row.client, row.status, row.duplicate_count) == (
        "acme:k-1", "acme", "processed", 2
    )
    assert row.response_status == 201 and row.result == first.json
    assert row.fingerprint.startswith("sha256:") and row.lock_owner is None


def test_a_402_is_stored_and_replayed_as_it_was(api, sql):
    first = deliver(api, "charges", {"amount": 100, "decline": True}, key="ch-1")
    assert first.status_code == 402
    assert first.json == {"error": "card_declined", "client": None}
    again = deliver(api, "charges", {"amount": 100, "decline": True}, key="ch-1")
    assert (again.status_code, again.json) == (402, first.json)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert effects(sql, "charges") == ["ch-1"]


def test_a_plain_return_value_is_a_200_with_that_body(api):
    first = deliver(api, "charges", {"plain": ["a", 1]}, key="p-1")
    assert (first.status_code, first.json) == (200, ["a", 1])
    assert first.content_type == "application/json"
    again = deliver(api, "charges", {"plain": ["a", 1]}, key="p-1")
    assert (again.status_code, again.json, again.headers["Idempotent-Replayed"]) == (
        200, ["a", 1], "true"
    )


@pytest.mark.parametrize("change", ["body", "path", "content type"])
def test_same_key_for_another_request_is_422_and_changes_nothing(api, sql, change):
    first = deliver(api, "charges", {"amount": 100}, key="m-1")
    assert first.status_code == 201
    before = sql("SELECT * FROM processed_events")
    url, body, headers = signed(api.application, "charges", {"amount": 100}, key="m-1")
    if change == "body":
        url, body, headers = signed(api.application, "charges", {"amount": 200}, key="m-1")
    elif change == "path":
        url = "/webhooks/charges"  # the same source, at its other URL
    else:
        headers["Content-Type"] = "application/json; charset=utf-8"
    refused = api.post(url, data=body, headers=headers)
    assert refused.status_code == 422
    assert refused.content_type == "application/problem+json"
    assert refused.json["error"] == "idempotency_key_mismatch"
    assert refused.json["type"] == "http://localhost/problems/idempotency_key_mismatch"
    assert refused.json["status"] == 422
    assert "m-1" in refused.json["detail"]
    assert sql("SELECT * FROM processed_events") == before  # not even duplicate_count
    assert effects(sql, "charges") == ["m-1"]


def test_fingerprint_false_replays_whatever_the_body(make_app, sql):
    config = json.loads(json.dumps(API_SOURCES))
    config["sources"]["charges"]["fingerprint"] = False
    api = make_app(config).test_client()
    first = deliver(api, "charges", {"amount": 100}, key="f-1")
    again = deliver(api, "charges", {"amount": 999}, key="f-1")
    assert (again.status_code, again.json) == (first.status_code, first.json)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert sql("SELECT fingerprint FROM processed_events")[0].fingerprint is None


def test_two_clients_with_one_key_are_two_requests_each_seeing_its_own(api, sql):
    acme = deliver(api, "emails", {"to": "a@acme.test"}, as_client="acme", key="shared")
    globex = deliver(api, "emails", {"to": "g@globex.test"}, as_client="globex", key="shared")
    assert acme.json["client"] == "acme" and globex.json["client"] == "globex"
    assert acme.json["id"] != globex.json["id"]
    assert "Idempotent-Replayed" not in globex.headers
    # Each retry gets its own client's answer, never the other's.
    assert deliver(api, "emails", {"to": "a@acme.test"}, as_client="acme", key="shared").json == (
        acme.json
    )
    assert deliver(
        api, "emails", {"to": "g@globex.test"}, as_client="globex", key="shared"
    ).json == globex.json
    # Globex replaying acme's exact request is globex's own new request... with a
    # different body its key is taken by its own first request: 422, nothing of acme's.
    crossed = deliver(api, "emails", {"to": "a@acme.test"}, as_client="globex", key="shared")
    assert crossed.status_code == 422
    assert "a@acme.test" not in crossed.get_data(as_text=True)
    assert effects(sql, "emails") == ["acme:shared", "globex:shared"]
    rows = sql("SELECT client, event_id FROM processed_events ORDER BY client")
    assert [(r.client, r.event_id) for r in rows] == [
        ("acme", "acme:shared"),
        ("globex", "globex:shared"),
    ]


def test_hmac_clients_are_named_by_x_client_and_checked_by_their_own_secret(api, sql):
    ok = deliver(api, "orders", {"to": "x"}, as_client="globex", key="o-1")
    assert ok.status_code == 201 and ok.json["client"] == "globex"
    url, body, headers = signed(api.application, "orders", {"to": "x"}, client="acme", key="o-2")
    headers["X-Client"] = "globex"  # acme's signature, claimed to be globex's
    forged = api.post(url, data=body, headers=headers)
    assert forged.status_code == 401
    assert forged.content_type == "application/problem+json"
    assert forged.json["error"] == "invalid_signature"
    del headers["X-Client"]
    anonymous = api.post(url, data=body, headers=headers)
    assert (anonymous.status_code, anonymous.json["error"]) == (401, "missing_credentials")
    assert effects(sql, "orders") == ["globex:o-1"]


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_credentials"),
        ({"Authorization": "Bearer nope"}, 401, "invalid_credentials"),
        ({"Authorization": f"Bearer {TOKENS['acme']}"}, 400, "missing_idempotency_key"),
    ],
)
def test_credentials_are_checked_before_the_key(api, sql, headers, status, code):
    response = api.post("/v1/emails", json={"to": "x"}, headers=headers)
    assert (response.status_code, response.json["error"]) == (status, code)
    assert response.content_type == "application/problem+json"
    problem = response.json
    assert problem["type"] == f"http://localhost/problems/{code}"
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert problem["message"] == problem["detail"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0


@pytest.mark.parametrize(
    ("key", "status", "code", "stored"),
    [
        ("", 400, "invalid_idempotency_key", None),
        ("x" * 256, 400, "invalid_idempotency_key", None),
        ("x" * 255, 201, None, "x" * 255),
        ("bad\x01key", 400, "invalid_idempotency_key", None),
        ("tab\tkey", 400, "invalid_idempotency_key", None),
        ("two,keys", 400, "invalid_idempotency_key", None),
        (f'"{UUID}"', 201, None, UUID),
        ('"with space"', 201, None, "with space"),
        ('"esc\\"aped"', 201, None, 'esc"aped'),
        ('""', 400, "invalid_idempotency_key", None),
        ('"open', 400, "invalid_idempotency_key", None),
        ('"a";param=1', 400, "invalid_idempotency_key", None),
    ],
)
def test_key_syntax_bare_and_structured_field_string(api, sql, key, status, code, stored):
    response = deliver(api, "emails", {"to": "x"}, as_client="acme", key=key)
    assert response.status_code == status, response.json
    if code:
        assert response.json["error"] == code
        assert response.content_type == "application/problem+json"
        assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    else:
        assert [r.event_id for r in sql("SELECT event_id FROM processed_events")] == [
            f"acme:{stored}"
        ]


def test_quoted_and_bare_forms_are_the_same_key(api, sql):
    first = deliver(api, "emails", {"to": "x"}, as_client="acme", key="same-key")
    again = deliver(api, "emails", {"to": "x"}, as_client="acme", key='"same-key"')
    assert again.headers["Idempotent-Replayed"] == "true" and again.json == first.json
    assert effects(sql, "emails") == ["acme:same-key"]


def test_an_exception_rolls_back_and_leaves_the_key_free_for_the_retry(api, sql):
    failed = deliver(api, "emails", {"to": "x", "fail": "smtp down"}, as_client="acme", key="e-1")
    assert failed.status_code == 500
    assert failed.content_type == "application/problem+json"
    assert failed.json["error"] == "handler_failed"
    assert "smtp down" not in failed.get_data(as_text=True)
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert effects(sql, "emails") == []
    [failure] = sql("SELECT event_id, permanent FROM delivery_failures")
    assert (failure.event_id, failure.permanent) == ("acme:e-1", False)
    # The client's retry (the "fix" is a payload without the failure) runs it now.
    retried = deliver(api, "emails", {"to": "x", "fail": ""}, as_client="acme", key="e-1")
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers
    assert effects(sql, "emails") == ["acme:e-1"]


def test_a_reject_is_stored_and_answered_422_every_time(api, sql):
    first = deliver(api, "emails", {"reject": "no such list"}, as_client="acme", key="r-1")
    assert (first.status_code, first.json) == (422, {"rejected": "no such list"})
    assert first.content_type == "application/json"  # the operation's answer, not a problem
    again = deliver(api, "emails", {"reject": "no such list"}, as_client="acme", key="r-1")
    assert (again.status_code, again.json) == (422, first.json)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert effects(sql, "emails") == []  # rolled back
    assert [r.permanent for r in sql("SELECT permanent FROM delivery_failures")] == [True]


def test_the_webhook_url_serves_the_api_too(api):
    url, body, headers = signed(api.application, "emails", {"to": "x"}, client="acme", key="w")
    first = api.post(url.replace("/v1/emails", "/webhooks/emails"), data=body, headers=headers)
    assert first.status_code == 201 and first.json["client"] == "acme"


def test_webhook_sources_keep_their_json_errors(make_app):
    config = {**API_SOURCES, "sources": {**API_SOURCES["sources"], "hooks": {
        "scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"
    }}}
    client = make_app(config).test_client()
    response = client.post("/webhooks/hooks", json={"id": "1"})
    assert response.status_code == 401 and response.content_type == "application/json"
    assert set(response.json) == {"error", "message"}


def in_background(call) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(call()))
    thread.start()
    return thread, answers


def test_a_request_whose_lease_was_taken_over_cannot_commit_its_work(api, sql):
    # What a lease that ran out while its request still ran would look like: another
    # request took the key (here: the test rewrites the owner while the operation runs).
    thread, answers = in_background(
        lambda: deliver(api, "emails", {"to": "x", "sleep": 0.5}, as_client="acme", key="l-1")
    )
    wait_for(lambda: sql("SELECT 1 FROM processed_events WHERE status = 'in_flight'"), "lease")
    sql("UPDATE processed_events SET lock_owner = 'another-request'")
    thread.join(timeout=30)
    [answer] = answers
    assert answer.status_code == 409 and answer.json["error"] == "idempotency_key_in_use"
    assert effects(sql, "emails") == []  # its work was rolled back with the refused COMMIT
    [row] = sql("SELECT status, lock_owner FROM processed_events")
    assert (row.status, row.lock_owner) == ("in_flight", "another-request")


def test_an_overrunning_operation_answers_503_and_frees_its_key_when_it_returns(make_app, sql):
    api = make_app(API_SOURCES, IDEMHOOK_HANDLER_TIMEOUT_MS=300).test_client()
    slow = deliver(api, "emails", {"to": "x", "sleep": 0.8}, as_client="acme", key="t-1")
    assert slow.status_code == 503
    assert slow.content_type == "application/problem+json"
    assert (slow.json["error"], slow.headers["Retry-After"]) == ("handler_timeout", "1")
    # In flight until the handler returns; then rolled back and the key released.
    busy = deliver(api, "emails", {"to": "x", "sleep": 0.8}, as_client="acme", key="t-1")
    assert busy.status_code == 409
    wait_for(lambda: not sql("SELECT 1 FROM processed_events"), "the key to be released")
    assert effects(sql, "emails") == []
    done = deliver(api, "emails", {"to": "x", "sleep": 0}, as_client="acme", key="t-1")
    assert done.status_code == 201
    assert effects(sql, "emails") == ["acme:t-1"]


def test_a_key_whose_row_is_locked_answers_409_after_the_lock_timeout(make_app, db_url, sql):
    api = make_app(API_SOURCES, IDEMHOOK_STATEMENT_TIMEOUT_MS=300).test_client()
    assert deliver(api, "emails", {"to": "x"}, as_client="acme", key="lk-1").status_code == 201
    holder = psycopg2.connect(**connect_args(db_url))
    try:
        with holder.cursor() as cur:  # an operator's `events replay` holds the row like this
            cur.execute("SELECT 1 FROM processed_events WHERE event_id = 'acme:lk-1' FOR UPDATE")
            locked = deliver(api, "emails", {"to": "x"}, as_client="acme", key="lk-1")
    finally:
        holder.rollback()
        holder.close()
    assert locked.status_code == 409 and locked.json["error"] == "idempotency_key_in_use"
    again = deliver(api, "emails", {"to": "x"}, as_client="acme", key="lk-1")
    assert again.headers["Idempotent-Replayed"] == "true"


DOCS = Path(__file__).resolve().parent.parent / "docs" / "idempotency-keys.md"


def anchors() -> set[str]:
    """The fragment ids of docs/idempotency-keys.md: ### headings and <a id="..."> tags."""
    text = DOCS.read_text()
    found = set(re.findall(r'<a id="([^"]+)"></a>', text))
    found |= {m.strip("` ").lower() for m in re.findall(r"^### (.+)$", text, re.M)}
    return found


def test_every_problem_type_links_to_its_entry_in_the_docs(make_app, sql):
    api = make_app(API_SOURCES, IDEMHOOK_HANDLER_TIMEOUT_MS=300).test_client()
    answers = [
        api.post("/v1/emails", json={}),
        api.post("/v1/emails", json={}, headers={"Authorization": "Bearer nope"}),
        api.post("/v1/charges", json={}),
        deliver(api, "emails", {}, as_client="acme", key=""),
        deliver(api, "emails", b"not json", as_client="acme", key="d-1"),
        deliver(api, "emails", [1], as_client="acme", key="d-2"),
        deliver(api, "emails", {"fail": "x"}, as_client="acme", key="d-3"),
        deliver(api, "emails", {"sleep": 0.5}, as_client="acme", key="d-4"),
        deliver(api, "emails", {"sleep": 0.5}, as_client="acme", key="d-4"),
        api.post("/v1/emails", data=b"{}", content_type="text/plain"),
        api.post("/v1/emails", data=b"x" * (2 * 1024 * 1024)),
    ]
    deliver(api, "emails", {"to": "a"}, as_client="acme", key="d-5")
    answers.append(deliver(api, "emails", {"to": "b"}, as_client="acme", key="d-5"))
    answers.append(api.post("/v1/charges", json={}, headers={"X-Signature": "sha256=00"}))
    # The overrun operation (d-4) frees its key once its handler returns.
    wait_for(lambda: not sql("SELECT 1 FROM processed_events WHERE status = 'in_flight'"), "d-4")
    problems = [a.json for a in answers]
    assert all(a.content_type == "application/problem+json" for a in answers), problems
    codes = {p["error"] for p in problems}
    assert codes >= {
        "missing_credentials", "invalid_credentials", "missing_signature",
        "invalid_signature", "invalid_idempotency_key", "invalid_json", "invalid_event",
        "handler_failed", "handler_timeout", "idempotency_key_in_use",
        "unsupported_media_type", "payload_too_large", "idempotency_key_mismatch",
    }
    documented = anchors()
    for problem in problems:
        # An absolute link to a page this server serves, explaining the code...
        link = urlsplit(problem["type"])
        assert (link.scheme, link.netloc, link.path) == (
            "http", "localhost", f"/problems/{problem['error']}"
        ), problem
        page = api.get(link.path)
        assert page.status_code == 200 and page.content_type.startswith("text/html")
        assert problem["error"] in page.text and problem["title"] in page.text
        # ...and documented in docs/idempotency-keys.md, where IDEMHOOK_DOCS_URL points.
        assert problem["error"] in documented, problem


# -- a plugin's own routes of an API (@api_view) -----------------------------------------------

READS = {**API_SOURCES, "plugins": [*API_SOURCES["plugins"], "tests.plugins.reads"]}


def hmac_get(secret: str) -> str:
    """The X-Signature of a GET with no Idempotency-Key and no body: HMAC over ``"."``."""
    return "sha256=" + hmac.new(secret.encode(), b".", hashlib.sha256).hexdigest()


def test_an_api_view_authenticates_the_sources_client_as_post_does(make_app):
    api = make_app(READS).test_client()
    deliver(api, "charges", {"amount": 1}, key="v-1")
    shown = api.get("/v1/charges/7", headers={"X-Signature": hmac_get(SECRET)})
    assert (shown.status_code, shown.json) == (200, {"client": None, "n": 7, "effects": 1})
    assert shown.content_type == "application/json"
    orders = "acme-order-secret-0123"
    mine = api.get("/v1/orders/mine", headers={"X-Client": "acme", "X-Signature": hmac_get(orders)})
    assert (mine.status_code, mine.json) == (200, {"client": "acme", "effects": 0})
    assert mine.headers["X-Seen"] == "1"
    refused = [
        api.get("/v1/charges/7"),
        api.get("/v1/charges/7", headers={"X-Signature": hmac_get("not-the-secret")}),
        # acme's name with globex's secret: no client signed it.
        api.get(
            "/v1/orders/mine",
            headers={"X-Client": "acme", "X-Signature": hmac_get("globex-order-secret-01")},
        ),
        api.get("/v1/orders/mine", headers={"X-Signature": hmac_get(orders)}),
    ]
    assert [r.status_code for r in refused] == [401, 401, 401, 401]
    assert [r.json["error"] for r in refused] == [
        "missing_signature", "invalid_signature", "invalid_signature", "missing_credentials"
    ]
    assert all(r.content_type == "application/problem+json" for r in refused)


def test_an_api_views_own_response_and_a_lost_database_are_answered_as_the_api_does(
    make_app, db_url
):
    api = make_app(READS).test_client()
    mine = api.get("/v1/charges/0", headers={"X-Signature": hmac_get(SECRET)})
    assert (mine.status_code, mine.content_type) == (404, "application/problem+json")
    assert mine.json["title"] == "Not found"
    down = make_app(READS, DATABASE_URL=db_url.set(host="127.0.0.1", port=closed_port()))
    lost = down.test_client().get("/v1/charges/7", headers={"X-Signature": hmac_get(SECRET)})
    assert (lost.status_code, lost.content_type) == (503, "application/problem+json")
    assert lost.json["error"] == "database_unavailable"
    assert lost.headers["Retry-After"] == "1"


# -- errors replayed on request (replay_errors), problem type pages ---------------------------


def test_a_failed_operation_is_not_kept_and_its_retry_runs_again_by_default(api, sql):
    failed = deliver(api, "emails", {"fail": "smtp down"}, as_client="acme", key="f-1")
    assert (failed.status_code, failed.json["error"]) == (500, "handler_failed")
    assert "is free: retry with it" in failed.json["detail"]
    assert sql("SELECT count(*) FROM processed_events") == [(0,)]  # the key is free
    retried = deliver(api, "emails", {"fail": "smtp down"}, as_client="acme", key="f-1")
    assert retried.status_code == 500 and "Idempotent-Replayed" not in retried.headers
    assert sql("SELECT count(*) FROM delivery_failures") == [(2,)]  # it ran twice


def test_replay_errors_stores_the_500_and_replays_it_without_running_again(make_app, sql):
    sources = {**API_SOURCES, "sources": {
        **API_SOURCES["sources"],
        "emails": {**API_SOURCES["sources"]["emails"], "replay_errors": True},
    }}
    api = make_app(sources).test_client()
    failed = deliver(api, "emails", {"fail": "smtp down"}, as_client="acme", key="f-1")
    assert failed.status_code == 500
    assert failed.content_type == "application/problem+json"
    assert failed.json["error"] == "handler_failed" and "is stored" in failed.json["detail"]
    for _ in range(2):
        again = deliver(api, "emails", {"fail": "smtp down"}, as_client="acme", key="f-1")
        assert again.status_code == 500 and again.headers["Idempotent-Replayed"] == "true"
        assert again.content_type == "application/problem+json"
        assert again.json == failed.json
    # It ran once: one failure row, none of its work kept; the key holds the 500.
    assert sql("SELECT count(*) FROM delivery_failures") == [(1,)]
    assert effects(sql, "emails") == []
    [key] = sql("SELECT status, response_status, duplicate_count FROM processed_events")
    assert (key.status, key.response_status, key.duplicate_count) == ("failed", 500, 2)
    # Another key runs normally.
    ok = deliver(api, "emails", {"to": "a@example.com"}, as_client="acme", key="f-2")
    assert ok.status_code == 201


def test_replay_errors_must_be_a_boolean(pg_url):
    sources = {"sources": {"emails": {**API_SOURCES["sources"]["emails"], "replay_errors": 1}}}
    with pytest.raises(ConfigError, match=r"replay_errors: must be true or false"):
        create_app({"DATABASE_URL": pg_url, "IDEMHOOK_CONFIG": sources})


def test_an_unknown_problem_type_page_is_a_json_404(api):
    missing = api.get("/problems/no_such_code")
    assert (missing.status_code, missing.json["error"]) == (404, "unknown_problem_type")
    assert api.get("/problems/..%2Fetc").status_code == 404


def test_problem_types_link_to_the_published_docs_when_configured(make_app):
    api = make_app(API_SOURCES, IDEMHOOK_DOCS_URL="https://docs.example.com/idemhook/").test_client()
    refused = api.post("/v1/emails", json={"to": "x"})
    assert refused.json["type"] == (
        "https://docs.example.com/idemhook/idempotency-keys.md#missing_credentials"
    )
