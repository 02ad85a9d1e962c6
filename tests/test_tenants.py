"""Tenants: ``POST /webhooks/<source>/<tenant>``, each verified with its own secrets.

In process first (codes, scoping, what is stored), then against real gunicorn workers:
two tenants each get their events and have the other's signature refused, and a secret
added while serving verifies the next delivery on every worker process.
"""

from __future__ import annotations

import json

import pytest
import requests
from cryptography.fernet import Fernet
from werkzeug.datastructures import Headers

from idemhook._config.schemes import SCHEMES, Delivery
from idemhook._engine.applier import apply_due
from idemhook.testing import deliver
from tests.conftest import SECRET
from tests.servers import gunicorn, pin_sessions

KEY = Fernet.generate_key().decode()
ALICE_SECRET = "alice-secret-0123456789abcdef"
BOB_SECRET = "bob-secret-fedcba9876543210"

TENANTS = {
    "plugins": ["tests.plugins.tenanted"],
    "sources": {
        # A static secret of its own, and tenants.
        "shop": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "event_type": "body:type",
            "tenants": True,
        },
        # Tenants only, handlers run by the worker.
        "shop_async": {
            "scheme": "hmac-sha256",
            "event_id": "body:id",
            "event_type": "body:type",
            "tenants": True,
            "mode": "async",
        },
    },
}


def sign(secret: str, body: bytes) -> dict[str, str]:
    """The headers of ``body`` signed with ``secret`` (as the tenant's provider signs it)."""
    scheme = SCHEMES["hmac-sha256"]("shop", {"secret": secret})
    return {"Content-Type": "application/json", **scheme.sign(Delivery(body, Headers()))}


def event(event_id: str, **extra) -> bytes:
    return json.dumps({"id": event_id, "type": "order.paid", **extra}).encode()


def post(client, path: str, secret: str, body: bytes):
    return client.post(path, data=body, headers=sign(secret, body))


def add_secret(runner, source: str, tenant: str, secret: str, *extra: str) -> int:
    result = runner.invoke(
        args=["secrets", "add", source, tenant, "--from-env", "TENANT_SECRET", *extra],
        env={"TENANT_SECRET": secret},
    )
    assert result.exit_code == 0, result.output
    return int(result.output.strip())


@pytest.fixture
def shop(make_app):
    """The receiver with the tenanted sources and IDEMHOOK_SECRETS_KEY."""
    return make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY)


@pytest.fixture
def tenants(shop):
    """Tenants alice and bob of shop, one secret each."""
    runner = shop.test_cli_runner()
    return {
        "alice": add_secret(runner, "shop", "alice", ALICE_SECRET),
        "bob": add_secret(runner, "shop", "bob", BOB_SECRET),
    }


def test_each_tenant_verified_with_its_own_secrets_and_scoped(shop, tenants, sql):
    client = shop.test_client()
    body = event("evt_1")
    alice = post(client, "/webhooks/shop/alice", ALICE_SECRET, body)
    assert alice.status_code == 200, alice.json
    assert alice.json["status"] == "processed"
    result = alice.json["result"]
    assert (result["tenant"], result["id"]) == ("alice", "alice:evt_1")
    # The same provider ID from another tenant is another event, not a duplicate.
    bob = post(client, "/webhooks/shop/bob", BOB_SECRET, body)
    assert bob.json["status"] == "processed"
    assert bob.json["result"]["tenant"] == "bob"
    assert post(client, "/webhooks/shop/bob", BOB_SECRET, body).json["status"] == "duplicate"
    # One tenant's signature is refused at the other's endpoint, and at the static one.
    crossed = post(client, "/webhooks/shop/bob", ALICE_SECRET, event("evt_2"))
    assert (crossed.status_code, crossed.json["error"]) == (401, "invalid_signature")
    static = post(client, "/webhooks/shop", ALICE_SECRET, event("evt_2"))
    assert (static.status_code, static.json["error"]) == (401, "invalid_signature")
    # The source's own secret still serves its own endpoint, untenanted.
    own = post(client, "/webhooks/shop", SECRET, body)
    assert own.json["status"] == "processed"
    assert own.json["result"]["tenant"] is None
    rows = sql("SELECT event_id, tenant FROM processed_events ORDER BY id")
    assert rows == [("alice:evt_1", "alice"), ("bob:evt_1", "bob"), ("evt_1", None)]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/webhooks/shop/carol", 404, "unknown_tenant"),  # no secret stored
        ("/webhooks/shop/bad:name", 404, "unknown_tenant"),  # ':' scopes event IDs
        ("/webhooks/shop/" + "x" * 65, 404, "unknown_tenant"),
        ("/webhooks/shop_async", 404, "unknown_tenant"),  # tenants only: no own secret
        ("/webhooks/nowhere/alice", 404, "unknown_source"),
    ],
)
def test_unknown_tenants_are_refused_and_nothing_is_written(
    shop, tenants, sql, path, status, code
):
    answer = post(shop.test_client(), path, ALICE_SECRET, event("evt_x"))
    assert (answer.status_code, answer.json["error"]) == (status, code)
    assert "alice-secret" not in answer.get_data(as_text=True)
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    # Nothing but the rejection log, which names the tenant the URL gave (not for a source
    # that is not configured: anyone could invent names).
    refused = sql("SELECT source, tenant, error, body_sha256 FROM rejected_deliveries")
    if code == "unknown_source":
        assert refused == []
    else:
        source, _, tenant = path.removeprefix("/webhooks/").partition("/")
        assert [tuple(r) for r in refused] == [(source, tenant or None, code, None)]


def test_a_tenant_whose_secrets_all_expired_is_401_no_live_secret(shop, tenants, sql):
    runner = shop.test_cli_runner()
    result = runner.invoke(args=["secrets", "expire", "shop", "alice", str(tenants["alice"])])
    assert result.exit_code == 0, result.output
    answer = post(shop.test_client(), "/webhooks/shop/alice", ALICE_SECRET, event("evt_1"))
    assert (answer.status_code, answer.json["error"]) == (401, "no_live_secret")
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 0
    assert sql("SELECT tenant, error, status_code FROM rejected_deliveries") == [
        ("alice", "no_live_secret", 401)
    ]
    # Removed: the tenant is unknown again.
    result = runner.invoke(args=["secrets", "remove", "shop", "alice", str(tenants["alice"])])
    assert result.exit_code == 0, result.output
    answer = post(shop.test_client(), "/webhooks/shop/alice", ALICE_SECRET, event("evt_1"))
    assert (answer.status_code, answer.json["error"]) == (404, "unknown_tenant")


def test_the_test_kit_delivers_as_a_tenant(shop, tenants):
    answer = deliver(shop.test_client(), "shop", {"id": "evt_k", "type": "t"}, tenant="bob")
    assert answer.status_code == 200, answer.json
    assert (answer.json["event_id"], answer.json["result"]["tenant"]) == ("bob:evt_k", "bob")


def test_async_tenant_events_reach_the_worker_with_their_tenant(shop, sql):
    add_secret(shop.test_cli_runner(), "shop_async", "alice", ALICE_SECRET)
    answer = post(shop.test_client(), "/webhooks/shop_async/alice", ALICE_SECRET, event("evt_a"))
    assert answer.status_code == 202, answer.json
    assert sql("SELECT event_id, tenant, status FROM processed_events") == [
        ("alice:evt_a", "alice", "received")
    ]
    assert apply_due(shop) == 1
    (result,) = sql("SELECT result FROM processed_events")[0]
    assert (result["tenant"], result["id"]) == ("alice", "alice:evt_a")


def test_a_failed_tenant_event_is_recorded_and_retried_as_the_tenants(shop, tenants, sql):
    body = event("evt_bad", fail=True)
    answer = post(shop.test_client(), "/webhooks/shop/alice", ALICE_SECRET, body)
    assert answer.status_code == 500
    assert sql("SELECT event_id, tenant FROM delivery_failures") == [("alice:evt_bad", "alice")]
    # `failures retry` parses the stored body again: the event keeps its tenant's ID.
    result = shop.test_cli_runner().invoke(args=["failures", "retry", "shop", "alice:evt_bad"])
    # (Retried as the tenant's: else "the stored body no longer yields event ...".)
    assert "alice:evt_bad: failed (tests.plugins.tenanted:seen raised" in result.output
    assert sql("SELECT event_id, tenant FROM delivery_failures ORDER BY id")[-1] == (
        "alice:evt_bad",
        "alice",
    )


def test_tenants_cannot_be_configured_where_they_mean_nothing(make_app):
    from idemhook._values.errors import ConfigError

    for table, says in [
        ({"scheme": "none", "allow_unverified": True}, "cannot have tenants"),
        (
            {"scheme": "hmac-sha256", "freshness": {"object": "body:o", "version": "body:v"}},
            "cannot have freshness",
        ),
    ]:
        config = {"sources": {"s": {"event_id": "body:id", "tenants": True, **table}}}
        with pytest.raises(ConfigError, match=says):
            make_app(config, IDEMHOOK_SECRETS_KEY=KEY)
    with pytest.raises(ConfigError, match="IDEMHOOK_SECRETS_KEY is not set"):
        make_app(TENANTS)


# -- against real gunicorn workers ------------------------------------------------------------


def http_post(target, url: str, secret: str, body: bytes) -> requests.Response:
    """POST ``body`` signed with ``secret`` (``target``: a pinned session, or requests)."""
    return target.post(url, data=body, headers=sign(secret, body), timeout=30)


def test_two_tenants_served_by_gunicorn_get_their_own_events_only(shop, tenants, pg_url, sql):
    with gunicorn(TENANTS, pg_url, env={"IDEMHOOK_SECRETS_KEY": KEY}) as server:
        for tenant, secret, other in (
            ("alice", ALICE_SECRET, BOB_SECRET),
            ("bob", BOB_SECRET, ALICE_SECRET),
        ):
            url = f"{server.url}/webhooks/shop/{tenant}"
            for n in range(4):  # a few, so that both workers answer some
                answer = http_post(requests, url, secret, event(f"evt_{n}"))
                assert answer.status_code == 200, answer.text
                assert answer.json()["result"]["tenant"] == tenant
            refused = http_post(requests, url, other, event("evt_other"))
            assert (refused.status_code, refused.json()["error"]) == (401, "invalid_signature")
    rows = sql("SELECT tenant, count(*) FROM processed_events GROUP BY tenant ORDER BY tenant")
    assert rows == [("alice", 4), ("bob", 4)]
    assert sql("SELECT count(*) FROM processed_events WHERE event_id LIKE '%evt_other'") == [(0,)]


def test_a_secret_added_while_serving_verifies_the_next_delivery_on_every_worker(
    shop, pg_url, sql
):
    runner = shop.test_cli_runner()
    sent = iter(range(10_000))

    def worker_of(session: requests.Session) -> int:
        answer = http_post(
            session, f"{server.url}/webhooks/shop", SECRET, event(f"pin_{next(sent)}")
        )
        return answer.json()["result"]["worker"]

    with gunicorn(TENANTS, pg_url, workers=2, env={"IDEMHOOK_SECRETS_KEY": KEY}) as server:
        pinned = pin_sessions(server, 1, worker_of)
        assert len(pinned) == 2
        url = f"{server.url}/webhooks/shop/carol"
        for sessions in pinned.values():
            before = http_post(sessions[0], url, ALICE_SECRET, event("evt_before"))
            assert (before.status_code, before.json()["error"]) == (404, "unknown_tenant")
        add_secret(runner, "shop", "carol", ALICE_SECRET)
        for pid, sessions in pinned.items():
            after = http_post(sessions[0], url, ALICE_SECRET, event(f"evt_after_{pid}"))
            assert after.status_code == 200, after.text
            assert after.json()["result"] == {
                "tenant": "carol",
                "id": f"carol:evt_after_{pid}",
                "worker": pid,
            }
        for sessions in pinned.values():
            sessions[0].close()


def test_a_batch_from_a_tenant_scopes_every_events_id(make_app, sql):
    config = {
        "plugins": ["tests.plugins.tenanted"],
        "sources": {
            **TENANTS["sources"],
            "bulk": {
                "scheme": "hmac-sha256",
                "event_id": "body:id",
                "batch": "array",
                "tenants": True,
            },
        },
    }
    app = make_app(config, IDEMHOOK_SECRETS_KEY=KEY)
    add_secret(app.test_cli_runner(), "bulk", "alice@example.com", ALICE_SECRET)
    batch = [{"id": "e1"}, {"id": "e2"}]
    answer = deliver(app.test_client(), "bulk", batch, tenant="alice@example.com")
    assert answer.status_code == 200, answer.json
    assert [e["event_id"] for e in answer.json["events"]] == [
        "alice@example.com:e1",
        "alice@example.com:e2",
    ]
    assert sql("SELECT DISTINCT tenant FROM processed_events") == [("alice@example.com",)]


def test_sign_refuses_a_source_with_no_secret_of_its_own(shop):
    result = shop.test_cli_runner().invoke(args=["sign", "shop_async", "-"], input="{}")
    assert result.exit_code == 2
    assert "source 'shop_async' has no secret of its own" in result.output
    signed_by_kit = shop.test_cli_runner().invoke(args=["sign", "shop", "-"], input="{}")
    assert signed_by_kit.exit_code == 0 and "/webhooks/shop" in signed_by_kit.output
