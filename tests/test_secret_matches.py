"""Which secret verified each delivery: static lists by position, tenants' secrets by id.

Counted in each process and written about once a second by each one (one statement per
secret seen): the tests wait for the exact counts in the database, summed over gunicorn's
worker processes.
"""

from __future__ import annotations

import json

import pytest
import requests
from cryptography.fernet import Fernet
from sqlalchemy import event as sa_event

from idemhook._engine.tenants import Matches
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from tests.reliability.conftest import wait_for
from tests.servers import gunicorn
from tests.test_operations import API_SOURCES
from tests.test_tenants import ALICE_SECRET, KEY, TENANTS, add_secret, event, http_post, sign

OLD = "old-static-secret-0123456789"
NEW = "new-static-secret-9876543210"

ROTATING = {
    "plugins": ["tests.plugins.tenanted"],
    "sources": {
        **TENANTS["sources"],
        # The rotation of a static secret: the provider still signs with OLD, or already
        # with NEW; both verify until OLD is taken out of the list.
        "shop": {**TENANTS["sources"]["shop"], "secret": [OLD, NEW]},
    },
}


def static_counts(sql, sources: tuple[str, ...] = ("shop",)) -> list[tuple]:
    """The counts of this test's own sources (another test's app may flush its tally into the
    shared database at any time)."""
    rows = sql("SELECT source, secret, matched_count FROM secret_matches ORDER BY source, secret")
    return [tuple(row) for row in rows if row[0] in sources]


def tenant_row(sql, secret_id: int) -> tuple:
    return sql(
        "SELECT matched_count, last_matched_at FROM source_secrets WHERE id = :id", id=secret_id
    )[0]


def test_static_list_records_which_position_matched_across_workers(make_app, pg_url, sql):
    app = make_app(ROTATING, IDEMHOOK_SECRETS_KEY=KEY)
    with gunicorn(ROTATING, pg_url, workers=2, env={"IDEMHOOK_SECRETS_KEY": KEY}) as server:
        url = f"{server.url}/webhooks/shop"
        for n in range(5):
            assert http_post(requests, url, OLD, event(f"old_{n}")).status_code == 200
        for n in range(3):
            assert http_post(requests, url, NEW, event(f"new_{n}")).status_code == 200
        expected = [("shop", "1", 5), ("shop", "2", 3)]
        wait_for(lambda: static_counts(sql) == expected, f"the counts {expected}")
    shown = app.test_cli_runner().invoke(args=["sources"]).output
    assert "secret 1: last matched 20" in shown and ", 5 deliveries" in shown, shown
    assert "secret 2: last matched 20" in shown and ", 3 deliveries" in shown, shown
    assert OLD not in shown and NEW not in shown


def test_rotation_with_an_expiring_old_secret_stops_its_last_match(make_app, pg_url, sql):
    app = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY)
    runner = app.test_cli_runner()
    old = add_secret(runner, "shop", "alice", ALICE_SECRET)
    with gunicorn(TENANTS, pg_url, workers=2, env={"IDEMHOOK_SECRETS_KEY": KEY}) as server:
        url = f"{server.url}/webhooks/shop/alice"
        for n in range(3):
            assert http_post(requests, url, ALICE_SECRET, event(f"a_{n}")).status_code == 200
        wait_for(lambda: tenant_row(sql, old)[0] == 3, "3 matches of the old secret")
        # The rotation: a new secret, and the old one expiring (now, for the test).
        new_secret = "alice-rotated-secret-abcdef0123"
        new = add_secret(runner, "shop", "alice", new_secret)
        stopped = tenant_row(sql, old)
        result = runner.invoke(args=["secrets", "expire", "shop", "alice", str(old)])
        assert result.exit_code == 0, result.output
        refused = http_post(requests, url, ALICE_SECRET, event("a_late"))
        assert (refused.status_code, refused.json()["error"]) == (401, "invalid_signature")
        for n in range(4):
            assert http_post(requests, url, new_secret, event(f"b_{n}")).status_code == 200
        wait_for(lambda: tenant_row(sql, new)[0] == 4, "4 matches of the new secret")
    assert tenant_row(sql, old) == stopped  # its last match stopped moving
    listed = runner.invoke(args=["secrets", "list", "shop", "alice", "--json"]).output
    rows = {row["id"]: row for row in map(json.loads, listed.splitlines())}
    assert (rows[old]["count"], rows[old]["live"]) == (3, False)
    assert (rows[new]["count"], rows[new]["live"]) == (4, True)
    assert rows[new]["last_matched"] > rows[old]["last_matched"]


def test_the_metric_counts_matches_by_position_and_id(make_app):
    app = make_app(ROTATING, IDEMHOOK_SECRETS_KEY=KEY)
    secret_id = add_secret(app.test_cli_runner(), "shop", "alice", ALICE_SECRET)
    client = app.test_client()
    for secret, path, n in ((OLD, "", 2), (NEW, "", 1), (ALICE_SECRET, "/alice", 3)):
        for i in range(n):
            body = event(f"{secret[:3]}_{i}")
            answer = client.post(f"/webhooks/shop{path}", data=body, headers=sign(secret, body))
            assert answer.status_code == 200, answer.json
    app.extensions["idemhook.matches"].flush()  # what its thread does once a second
    text = client.get("/metrics").get_data(as_text=True)
    assert 'idemhook_secret_matches_total{secret="1",source="shop"} 2.0' in text
    assert 'idemhook_secret_matches_total{secret="2",source="shop"} 1.0' in text
    assert f'idemhook_secret_matches_total{{secret="id:{secret_id}",source="shop"}} 3.0' in text
    assert OLD not in text and ALICE_SECRET not in text


def test_a_flush_writes_each_secret_once_however_many_deliveries(make_app, sql):
    app = make_app(ROTATING, IDEMHOOK_SECRETS_KEY=KEY)
    secret_id = add_secret(app.test_cli_runner(), "shop", "alice", ALICE_SECRET)
    database = app.extensions["idemhook.db"]
    # A tally of its own, whose thread would flush only after an hour: the test's flush
    # is the only one.
    matches = Matches(database, flush_seconds=3600)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    for _ in range(20):
        matches.static("shop", 0)
        matches.tenant("shop", secret_id)
    matches.static("shop", 1)
    sa_event.listen(database.reserve, "before_cursor_execute", seen)  # where it writes
    try:
        matches.close()
    finally:
        sa_event.remove(database.reserve, "before_cursor_execute", seen)
    writes = [s for s in statements if "secret_matches" in s or "source_secrets" in s]
    assert len(writes) == 3  # one per secret seen, not one per delivery
    assert static_counts(sql) == [("shop", "1", 20), ("shop", "2", 1)]
    assert tenant_row(sql, secret_id)[0] == 20


def test_flushes_write_on_one_kept_connection_beside_the_lanes(make_app, sql):
    """Once a second per worker: opening a connection for each flush cost PostgreSQL about
    4 ms of CPU. The flushes share one connection the process keeps beside the claim's
    lanes: they open no other, and take nothing from the lanes a delivery needs."""
    app = make_app(ROTATING, IDEMHOOK_SECRETS_KEY=KEY)
    secret_id = add_secret(app.test_cli_runner(), "shop", "alice", ALICE_SECRET)
    database = app.extensions["idemhook.db"]
    matches = Matches(database, flush_seconds=3600)  # only the test's flushes
    opened: list[object] = []
    on_lanes: list[str] = []

    def connected(*args):
        opened.append(args)

    def seen(conn, cursor, statement, *args):
        on_lanes.append(statement)

    sa_event.listen(database.reserve, "connect", connected)
    sa_event.listen(database.engine, "before_cursor_execute", seen)
    try:
        for flush in range(3):
            matches.static("shop", 0)
            matches.static("shop", 0)
            matches.tenant("shop", secret_id)
            matches.flush()
            assert len(opened) == 1, f"flush {flush}"  # the first flush's, kept since
            assert static_counts(sql) == [("shop", "1", 2 * (flush + 1))]
            assert tenant_row(sql, secret_id)[0] == flush + 1
        assert not [s for s in on_lanes if "secret_matches" in s or "source_secrets" in s]
    finally:
        sa_event.remove(database.reserve, "connect", connected)
        sa_event.remove(database.engine, "before_cursor_execute", seen)


def test_with_session_pooler_no_connection_is_kept_for_flushes(make_app, sql):
    """``IDEMHOOK_POOL_MODE=session-pooler`` keeps no connection: each flush opens one and
    closes it, as every other use of the database there."""
    app = make_app(ROTATING, IDEMHOOK_SECRETS_KEY=KEY, IDEMHOOK_POOL_MODE="session-pooler")
    database = app.extensions["idemhook.db"]
    matches = Matches(database, flush_seconds=3600)
    opened: list[object] = []

    def connected(*args):
        opened.append(args)

    sa_event.listen(database.reserve, "connect", connected)
    try:
        for _ in range(2):
            matches.static("shop", 1)
            matches.flush()
        assert len(opened) == 2
        assert static_counts(sql) == [("shop", "2", 2)]
    finally:
        sa_event.remove(database.reserve, "connect", connected)


def test_a_malformed_key_is_named_by_position_never_shown(make_app):
    good = Fernet.generate_key().decode()
    with pytest.raises(ConfigError) as caught:
        make_app(TENANTS, IDEMHOOK_SECRETS_KEY=f"{good},not-a-key-at-all")
    assert "key 2 of 2 is not a Fernet key" in str(caught.value)
    assert good not in str(caught.value) and "not-a-key-at-all" not in str(caught.value)


def test_an_apis_clients_secrets_are_counted_too(make_app, sql):
    app = make_app(API_SOURCES)
    client = app.test_client()
    for n in range(2):
        answer = deliver(client, "orders", {"to": "x"}, as_client="globex", key=f"g{n}")
        assert answer.status_code == 201, answer.json
    assert deliver(client, "emails", {"to": "y"}, as_client="acme", key="e1").status_code == 201
    assert deliver(client, "charges", {"amount": 1}, key="c1").status_code < 300
    app.extensions["idemhook.matches"].flush()
    assert static_counts(sql, ("charges", "emails", "orders")) == [
        ("charges", "1", 1),
        ("emails", "acme:1", 1),
        ("orders", "globex:1", 2),
    ]
    shown = app.test_cli_runner().invoke(args=["sources"]).output
    assert "client globex, secret: last matched 20" in shown and ", 2 deliveries" in shown
    assert "client acme, secret: never matched" in shown  # orders' acme
