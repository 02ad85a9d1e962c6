"""Tenants on the SQLite demo database: the same claim, scoping and match counts."""

from __future__ import annotations

import pytest

from idemhook._engine.applier import apply_due
from tests.conftest import SECRET
from tests.test_tenants import ALICE_SECRET, KEY, TENANTS, add_secret, event, post


@pytest.fixture
def db_url(sqlite_url):
    """The demo backend."""
    return sqlite_url


def test_tenants_on_sqlite(make_app, sql):
    app = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY)
    runner = app.test_cli_runner()
    secret_id = add_secret(runner, "shop", "alice", ALICE_SECRET)
    add_secret(runner, "shop_async", "alice", ALICE_SECRET)
    client = app.test_client()
    answer = post(client, "/webhooks/shop/alice", ALICE_SECRET, event("evt_1"))
    assert answer.status_code == 200, answer.json
    assert answer.json["result"]["tenant"] == "alice"
    accepted = post(client, "/webhooks/shop_async/alice", ALICE_SECRET, event("evt_2"))
    assert accepted.status_code == 202, accepted.json
    assert apply_due(app) == 1
    rows = sql("SELECT source, event_id, tenant, status FROM processed_events ORDER BY id")
    assert rows == [
        ("shop", "alice:evt_1", "alice", "processed"),
        ("shop_async", "alice:evt_2", "alice", "processed"),
    ]
    for n in range(2):  # the source's own secret, twice: one upsert, then its update
        assert post(client, "/webhooks/shop", SECRET, event(f"own_{n}")).status_code == 200
        app.extensions["idemhook.matches"].flush()
    assert sql("SELECT matched_count FROM source_secrets WHERE id = :id", id=secret_id) == [(1,)]
    # Only this test's source: another test's app may flush its own tally at any time.
    matched = sql("SELECT source, secret, matched_count FROM secret_matches WHERE source = 'shop'")
    assert matched == [("shop", "1", 2)]
    listed = runner.invoke(args=["secrets", "list", "shop"])
    assert listed.exit_code == 0 and ALICE_SECRET not in listed.output
