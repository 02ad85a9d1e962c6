"""idempotency-key sources from the operator's side: sign/send, events and the read API by
client, sources, replay, retry, prune, the configuration's checks, and SQLite."""

from __future__ import annotations

import json
import shlex

import pytest

from idemhook import create_app
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from tests.test_api import AUTH, TOKEN
from tests.test_events_cli import lines
from tests.test_operations import API_SOURCES, TOKENS
from tests.test_plugins_cli import serve  # noqa: F401  (the fixture)


@pytest.fixture
def api_app(make_app):
    """The receiver with the test APIs and the read API on."""
    return make_app(API_SOURCES, IDEMHOOK_ADMIN_TOKEN=TOKEN)


def test_send_with_client_and_key_shows_the_answer_and_then_its_replay(
    api_app, serve, tmp_path, sql  # noqa: F811
):
    url = serve(api_app)
    body = tmp_path / "email.json"
    body.write_text(json.dumps({"to": "a@example.com"}))
    args = ["send", "emails", str(body), "--url", url, "--client", "globex", "--key", "cli-1"]
    runner = api_app.test_cli_runner()
    first = runner.invoke(args=args)
    assert first.exit_code == 0, first.output
    status, *headers, answer = first.output.strip().split("\n")
    assert status == "HTTP 201"
    assert "Location: /v1/emails/1" in headers and "X-Operation: created" in headers
    assert json.loads(answer) == {"id": 1, "client": "globex", "to": "a@example.com"}
    again = runner.invoke(args=args)
    assert again.exit_code == 0
    assert "Idempotent-Replayed: true" in again.output.split("\n")
    assert json.loads(again.output.strip().split("\n")[-1]) == json.loads(answer)
    assert [r.event_id for r in sql("SELECT event_id FROM test_effects")] == ["globex:cli-1"]
    other = body.with_name("other.json")
    other.write_text(json.dumps({"to": "b@example.com"}))
    refused = runner.invoke(args=["send", "emails", str(other), *args[3:]])
    assert refused.exit_code == 1
    assert "HTTP 422" in refused.output and "idempotency_key_mismatch" in refused.output


def test_sign_prints_a_curl_to_the_path_as_the_client_with_the_key(api_app):
    runner = api_app.test_cli_runner()
    result = runner.invoke(args=["sign", "emails", "-", "--client", "acme", "--key", "k-9"],
                           input='{"to": "x"}')
    assert result.exit_code == 0, result.output
    words = shlex.split(result.output)
    assert "http://127.0.0.1:8000/v1/emails" in words
    assert f"Authorization: Bearer {TOKENS['acme']}" in words
    assert "Idempotency-Key: k-9" in words
    unknown = runner.invoke(args=["sign", "emails", "-", "--client", "initech"], input="{}")
    assert unknown.exit_code == 2 and "no client 'initech'" in unknown.output
    webhook = runner.invoke(args=["sign", "charges", "-", "--key", "k-10"], input="{}")
    assert "http://127.0.0.1:8000/v1/charges" in shlex.split(webhook.output)


def test_events_and_the_read_api_filter_and_show_by_client(api_app, sql):
    client = api_app.test_client()
    deliver(client, "emails", {"to": "a"}, as_client="acme", key="q-1")
    deliver(client, "emails", {"to": "g"}, as_client="globex", key="q-1")
    runner = api_app.test_cli_runner()
    listed = lines(runner.invoke(args=["events", "list", "--client", "acme", "--json"]))
    assert [(e["event_id"], e["client"], e["response_status"]) for e in listed] == [
        ("acme:q-1", "acme", 201)
    ]
    [shown] = lines(runner.invoke(args=["events", "show", "emails", "q-1", "--client", "globex",
                                        "--json"]))
    assert shown["result"]["to"] == "g" and shown["response_headers"][0][0] == "Location"
    assert shown["status"] == "processed" and shown["expires_at"].endswith("Z")
    page = client.get("/events?client=globex", headers=AUTH).json["events"]
    assert [e["event_id"] for e in page] == ["globex:q-1"]
    one = client.get("/events/emails/q-1?client=acme", headers=AUTH)
    assert one.status_code == 200 and one.json["result"]["to"] == "a"
    # A client's token is not the admin token: it reads nothing, its own keys included.
    for path in ("/events", "/events/emails/q-1?client=acme"):
        refused = client.get(path, headers={"Authorization": f"Bearer {TOKENS['acme']}"})
        assert refused.status_code == 401


def test_sources_lists_the_api_path_and_its_clients(api_app):
    result = api_app.test_cli_runner().invoke(args=["sources"])
    assert result.exit_code == 0, result.output
    block = result.output.split("emails\n", 1)[1].split("\n\n")[0]
    assert "register   https://<your-host>/v1/emails" in block
    assert "secret     resolves (2 clients: acme, globex)" in block


def test_failures_retry_is_refused_for_an_api_and_replay_rewrites_its_answer(api_app, sql):
    client = api_app.test_client()
    deliver(client, "emails", {"to": "x", "fail": "down"}, as_client="acme", key="f-1")
    runner = api_app.test_cli_runner()
    retried = runner.invoke(args=["failures", "retry", "emails", "acme:f-1"])
    assert retried.exit_code != 0 and "its client retries with the same key" in retried.output
    # The key alone (as the client sent it) is answered the same way, not "no failure".
    bare = runner.invoke(args=["failures", "retry", "emails", "f-1"])
    assert bare.exit_code != 0 and "its client retries with the same key" in bare.output
    assert sql("SELECT count(*) FROM processed_events") == [(0,)]

    deliver(client, "emails", {"to": "x", "decline": True}, as_client="acme", key="r-1")
    sql("UPDATE processed_events SET payload = '{\"to\": \"x\"}'")  # the fix, as replay sees it
    replayed = runner.invoke(args=["events", "replay", "emails", "acme:r-1", "--force", "--json"])
    assert replayed.exit_code == 0, replayed.output
    [row] = lines(replayed)
    assert row["response_status"] == 201 and row["result"]["client"] == "acme"
    again = deliver(client, "emails", {"to": "x", "decline": True}, as_client="acme", key="r-1")
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (201, "true")


def test_prune_keeps_a_key_in_flight_and_replay_refuses_it(api_app, sql):
    deliver(api_app.test_client(), "emails", {"to": "x"}, as_client="acme", key="p-1")
    sql(
        "UPDATE processed_events SET status = 'in_flight', lock_owner = 'someone', "
        "locked_until = now() + interval '1 hour', received_at = now() - interval '40 days'"
    )
    runner = api_app.test_cli_runner()
    pruned = runner.invoke(args=["events", "prune", "--older-than", "30d"])
    assert pruned.exit_code == 0 and "pruned 0 events" in pruned.output
    refused = runner.invoke(args=["events", "replay", "emails", "acme:p-1", "--force"])
    assert refused.exit_code != 0 and "in flight" in refused.output
    sql("UPDATE processed_events SET locked_until = now() - interval '1 second'")
    pruned = runner.invoke(args=["events", "prune", "--older-than", "30d"])
    assert "pruned 1 events" in pruned.output  # a lease that ran out: an abandoned claim


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"secret": "x" * 20, "clients": {"a": "y" * 20}}, "secret and clients: give one"),
        ({}, "secret: missing"),
        ({"clients": {}}, "clients: a table"),
        ({"clients": {"a:b": "y" * 20}}, "a client name is"),
        ({"clients": {"a": "same-secret-0123", "b": "same-secret-0123"}}, "the same secret as a"),
        ({"secret": "x" * 20, "path": "v1/emails"}, "path: an absolute URL path"),
        ({"secret": "x" * 20, "path": "/v1/<id>"}, "path: an absolute URL path"),
        ({"secret": "x" * 20, "path": "/events"}, "already served by one of idemhook's"),
        ({"secret": "x" * 20, "path": "/v1/charges"}, "already served by source 'charges'"),
        ({"secret": "x" * 20, "key_ttl": "1w"}, "key_ttl: a duration"),
        ({"secret": "x" * 20, "key_ttl": 60}, "key_ttl: a duration"),
        ({"secret": "x" * 20, "fingerprint": "no"}, "fingerprint: must be true or false"),
        ({"secret": "x" * 20, "event_id": "body:id"}, "event_id: an idempotency-key source"),
        ({"secret": "x" * 20, "batch": "array"}, "batch: an API request is one operation"),
        ({"clients": {"a": "y" * 20}, "auth": "bearer", "client_header": "X-Who"}, "client_header"),
        ({"secret": "x" * 20, "auth": "basic"}, "auth: 'hmac' or 'bearer'"),
    ],
)
def test_configuration_mistakes_stop_start_up_naming_the_key(db_url, table, problem):
    config = {**API_SOURCES, "sources": {**API_SOURCES["sources"]}}
    config["sources"]["extra"] = {"scheme": "idempotency-key", **table}
    with pytest.raises(ConfigError, match="extra") as raised:
        create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": config})
    assert problem in str(raised.value)


@pytest.fixture
def sqlite_api(make_app, sqlite_url):
    """The test APIs on the demo's SQLite."""
    app = create_app({"DATABASE_URL": sqlite_url, "IDEMHOOK_CONFIG": API_SOURCES})
    app.config["TESTING"] = True
    yield app
    engine = app.extensions["idemhook.db"].engine
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM processed_events")
        conn.exec_driver_sql("DELETE FROM delivery_failures")
        conn.exec_driver_sql("DELETE FROM test_effects")
    engine.dispose()


def test_the_same_semantics_on_sqlite(sqlite_api):
    client = sqlite_api.test_client()
    first = deliver(client, "emails", {"to": "s"}, as_client="acme", key="s-1")
    assert first.status_code == 201
    again = deliver(client, "emails", {"to": "s"}, as_client="acme", key="s-1")
    assert (again.status_code, again.json, again.headers["Idempotent-Replayed"]) == (
        201, first.json, "true"
    )
    other = deliver(client, "emails", {"to": "t"}, as_client="acme", key="s-1")
    assert other.status_code == 422
    failed = deliver(client, "emails", {"fail": "x"}, as_client="acme", key="s-2")
    assert failed.status_code == 500
    retried = deliver(client, "emails", {"fail": ""}, as_client="acme", key="s-2")
    assert retried.status_code == 201
