"""Unexpected errors answer 500 internal_error, logged once without request data; HTTP codes."""

from __future__ import annotations

import logging

import pytest
from flask import request
from sqlalchemy import text
from werkzeug.exceptions import BadRequest, InternalServerError, RequestedRangeNotSatisfiable

from idemhook._values.errors import INTERNAL_MESSAGE
from idemhook.testing.kit import deliver
from tests.test_openapi_routes import conforms

EVENT = {"id": "u1", "type": "contact.updated", "card": "4242-secret"}


def error_records(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_unexpected_exception_in_a_scheme_answers_internal_error_and_serving_goes_on(
    make_app, sql, caplog, monkeypatch
):
    app = make_app()
    client = app.test_client()
    scheme = app.extensions["idemhook.receiver"].sources["acme"].scheme

    def parse_with_a_bug(body: bytes):
        raise ValueError(f"cannot read {body!r}")  # quotes the payload, as real bugs do

    monkeypatch.setattr(scheme, "parse", parse_with_a_bug)
    response = deliver(client, "acme", EVENT)
    assert response.status_code == 500
    assert response.json == {"error": "internal_error", "message": INTERNAL_MESSAGE}
    assert b"4242" not in response.data
    conforms(response, "/webhooks/{source}", "post")
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0

    (record,) = error_records(caplog)  # once, and by nothing else (Flask's logger)
    assert record.name == "idemhook.errors"
    logged = record.getMessage()
    assert "unexpected ValueError in POST /webhooks/<source_name>" in logged
    assert "in parse_with_a_bug" in logged  # the frame that raised
    assert "ValueError (message not logged)" in logged
    assert "4242" not in logged

    monkeypatch.undo()
    again = deliver(client, "acme", EVENT)
    assert again.status_code == 200 and again.json["status"] == "processed"
    assert client.get("/healthz").status_code == 200


def test_traceback_in_the_log_keeps_the_chain_and_the_sqlstate_but_no_message(make_app, caplog):
    app = make_app()
    engine = app.extensions["idemhook.db"].engine

    @app.get("/test-only/division")
    def division():
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1 / 0"))
        except Exception as exc:
            raise RuntimeError(f"while reading card {request.args['card']}") from exc

    response = app.test_client().get("/test-only/division?card=4242")
    assert response.status_code == 500
    assert response.json["error"] == "internal_error"
    (record,) = error_records(caplog)
    logged = record.getMessage()
    # Python's order: the root cause first, then what each one caused.
    names = [
        "psycopg2.errors.DivisionByZero (SQLSTATE 22012, message not logged)",
        "sqlalchemy.exc.DataError (message not logged)",
        "RuntimeError (message not logged)",
    ]
    positions = [logged.index(name) for name in names]
    assert positions == sorted(positions)
    assert logged.count("The above exception was the direct cause of the following") == 2
    assert "division by zero" not in logged and "4242" not in logged


def test_a_request_that_fails_after_its_view_answers_internal_error(make_app):
    # Flask handles an exception from an after_request hook itself (as a 500), outside
    # the error handlers; in production (no TESTING) that answer is internal_error too.
    app = make_app(PROPAGATE_EXCEPTIONS=False)
    failures = ["once"]

    @app.after_request
    def hook_with_a_bug(response):
        if failures:
            failures.pop()
            raise KeyError("x")
        return response

    response = app.test_client().get("/healthz")
    assert response.status_code == 500
    assert response.json == {"error": "internal_error", "message": INTERNAL_MESSAGE}
    conforms(response, "/healthz")
    assert app.test_client().get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InternalServerError(), "internal_error"),
        (BadRequest(), "bad_request"),
        (RequestedRangeNotSatisfiable(), "http_error"),  # nothing here produces 416
    ],
    ids=lambda value: getattr(value, "code", value),
)
def test_werkzeug_http_errors_keep_their_status_with_a_documented_code(
    make_app, caplog, error, code
):
    app = make_app()

    @app.get("/test-only/http")
    def fails():
        raise error

    response = app.test_client().get("/test-only/http")
    assert response.status_code == error.code
    assert response.json["error"] == code and response.json["message"]
    assert error_records(caplog) == []  # an HTTP error is not a bug


def test_body_cut_short_by_the_client_is_400_bad_request(client, sql):
    # The sender announced more bytes than it sent (its connection dropped).
    response = client.post(
        "/webhooks/open",
        data=b'{"n": 1}',
        headers={"X-Event-Id": "cut-1"},
        content_type="application/json",
        environ_overrides={"CONTENT_LENGTH": "100"},
    )
    assert response.status_code == 400
    assert response.json["error"] == "bad_request"
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
