"""``IDEMHOOK_PREPARED_STATEMENTS``: the claim's and the keys' statements prepared once per lane.

What a user would notice if it went wrong: a delivery or an API request answered or
stored differently with the setting on; the setting doing nothing (the statements
still parsed and planned on every request); or, behind a transaction-mode pooler where
a session lacks the statements, a delivery lost or applied twice, or every later
delivery failing too.
"""

from __future__ import annotations

import logging

import pytest

from idemhook._config.settings import load as load_settings
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from tests.test_direct_dispatch import CASES, CONFIG, answer_and_store, api_new

#: An event type the test sources' recorder handles.
TYPE = "contact.updated"


def _executions(app) -> dict[str, int]:
    """The idemhook statements prepared on the (one) kept lane's session, and how often
    each was executed there."""
    lanes = app.extensions["idemhook.db"].lanes
    with lanes.lane() as lane:
        lane.cursor.execute(
            "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
            "WHERE name LIKE 'idemhook_%'"
        )
        return dict(lane.cursor.fetchall())


@pytest.mark.parametrize("case", CASES)
def test_a_request_is_answered_and_stored_alike_with_statements_prepared(
    make_app, sql, db_url, case
):
    text, prepared = (
        answer_and_store(make_app(CONFIG, IDEMHOOK_PREPARED_STATEMENTS=on), case, sql, db_url)
        for on in (False, True)
    )
    assert int(text[0][:3]) == CASES[case][1]
    assert prepared == text


def test_the_claims_and_keys_statements_run_prepared(make_app):
    """With the setting on, the claim and the key's statements are EXECUTEd on the lane's
    session (PostgreSQL counts each execution of a prepared statement); off, none is."""
    app = make_app(CONFIG, IDEMHOOK_PREPARED_STATEMENTS=True, IDEMHOOK_POOL_SIZE=1)
    client = app.test_client()
    receiver = app.extensions["idemhook.receiver"]
    claims = receiver.claimer.statements
    for n in range(3):
        assert deliver(client, "acme", {"id": f"p{n}", "type": TYPE}).status_code == 200
    assert deliver(client, "acme", {"id": "p0", "type": TYPE}).json["status"] == "duplicate"
    prepared = app.extensions["idemhook.db"].lanes.prepared.statements
    executed = _executions(app)
    assert executed[prepared[claims.claim_sql].name] == 4
    assert executed[prepared[claims.finish_sql].name] == 3

    off = make_app(CONFIG, IDEMHOOK_PREPARED_STATEMENTS=False, IDEMHOOK_POOL_SIZE=1)
    assert deliver(off.test_client(), "acme", {"id": "q1", "type": TYPE}).status_code == 200
    assert _executions(off) == {}


def test_keys_statements_run_prepared(make_app):
    app = make_app(CONFIG, IDEMHOOK_PREPARED_STATEMENTS=True, IDEMHOOK_POOL_SIZE=1)
    client = app.test_client()
    first = api_new(client)
    again = api_new(client)
    assert first.status_code == again.status_code == 201
    assert first.get_data() == again.get_data()
    keys = app.extensions["idemhook.operations"].keys.statements
    prepared = app.extensions["idemhook.db"].lanes.prepared.statements
    executed = _executions(app)
    assert executed[prepared[keys.lease_sql].name] == 2
    assert executed[prepared[keys.read_sql].name] == 2
    assert executed[prepared[keys.finish_checked_sql].name] == 1


def test_a_session_without_the_statements_loses_one_transaction_and_preparing_stops(
    make_app, sql, caplog
):
    """As behind a transaction-mode pooler: the lane's session no longer has its prepared
    statements. The delivery that meets it is rolled back whole and answered 5xx (its
    sender retries), the log says why, and every later delivery is served as text;
    nothing is applied twice or lost."""
    app = make_app(CONFIG, IDEMHOOK_PREPARED_STATEMENTS=True, IDEMHOOK_POOL_SIZE=1)
    client = app.test_client()
    assert deliver(client, "acme", {"id": "m1", "type": TYPE}).status_code == 200
    lanes = app.extensions["idemhook.db"].lanes
    with lanes.lane() as lane:
        lane.cursor.execute("DEALLOCATE ALL")  # what another server session looks like
    caplog.set_level(logging.ERROR, logger="idemhook.db")

    lost = deliver(client, "acme", {"id": "m2", "type": TYPE})
    assert lost.status_code >= 500
    assert sql("SELECT event_id FROM processed_events ORDER BY event_id") == [("m1",)]
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'm2'") == [(0,)]
    [line] = [r.getMessage() for r in caplog.records if r.name == "idemhook.db"]
    assert "IDEMHOOK_PREPARED_STATEMENTS" in line and "pooler" in line

    retried = deliver(client, "acme", {"id": "m2", "type": TYPE})
    assert retried.status_code == 200 and retried.json["status"] == "processed"
    assert deliver(client, "acme", {"id": "m2", "type": TYPE}).json["status"] == "duplicate"
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'm2'") == [(1,)]
    assert lanes.prepared.enabled is False and _executions(app) == {}


def test_a_lane_opened_on_a_connection_that_has_the_statements_keeps_them_prepared(
    make_app, caplog
):
    """More lanes open at once than are kept (a burst, a handler that overran): the extra
    lane's connection goes back to the engine's pool with its statements prepared, and a
    lane opened later may get it. PostgreSQL refuses to prepare them again (42P05, the
    session has them); they stay prepared and registered. Before, each refusal took its
    statement out of the registry: every later request of the process sent as text."""
    app = make_app(CONFIG, IDEMHOOK_PREPARED_STATEMENTS=True, IDEMHOOK_POOL_SIZE=1)
    client = app.test_client()
    assert deliver(client, "acme", {"id": "b0", "type": TYPE}).status_code == 200
    lanes = app.extensions["idemhook.db"].lanes
    registered = dict(lanes.prepared.statements)
    with lanes.lane() as first, lanes.lane() as second:  # one more than is kept (1)
        sessions = {lane.cursor.connection.get_backend_pid() for lane in (first, second)}
    caplog.set_level(logging.WARNING, logger="idemhook.db")
    with lanes.lane() as kept, lanes.lane() as reopened:
        # The second is a new lane on the connection the pool kept: the case under test.
        assert {lane.cursor.connection.get_backend_pid() for lane in (kept, reopened)} == sessions
        assert reopened._prepared_names == {s.name for s in registered.values()}
    assert lanes.prepared.statements == registered
    assert not [r.getMessage() for r in caplog.records if r.name == "idemhook.db"]

    claims = app.extensions["idemhook.receiver"].claimer.statements
    assert deliver(client, "acme", {"id": "b1", "type": TYPE}).status_code == 200
    assert _executions(app)[registered[claims.claim_sql].name] >= 1  # EXECUTEd, not text


def test_the_setting_is_refused_with_a_pool_mode_that_keeps_no_connection(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://localhost/idemhook")
    monkeypatch.setenv("IDEMHOOK_PREPARED_STATEMENTS", "true")
    assert load_settings()["IDEMHOOK_PREPARED_STATEMENTS"] is True
    monkeypatch.setenv("IDEMHOOK_POOL_MODE", "session-pooler")
    with pytest.raises(ConfigError, match="IDEMHOOK_PREPARED_STATEMENTS"):
        load_settings()
    monkeypatch.setenv("IDEMHOOK_PREPARED_STATEMENTS", "sometimes")
    monkeypatch.delenv("IDEMHOOK_POOL_MODE")
    with pytest.raises(ConfigError, match="true or false"):
        load_settings()


def test_a_schema_change_under_a_prepared_statement_costs_one_delivery_and_its_connection(
    make_app, sql
):
    """A migration that changes the type of a column the claim returns makes PostgreSQL
    refuse the lane's prepared claim ("cached plan must not change result type"): that
    delivery is rolled back and answered 5xx, the lane's connection is replaced, and the
    next delivery (the retry) is applied on a fresh one, once."""
    app = make_app(CONFIG, IDEMHOOK_PREPARED_STATEMENTS=True, IDEMHOOK_POOL_SIZE=1)
    client = app.test_client()
    assert deliver(client, "acme", {"id": "s1", "type": TYPE}).status_code == 200
    sql("ALTER TABLE processed_events ALTER COLUMN status TYPE varchar(20)")
    try:
        refused = deliver(client, "acme", {"id": "s2", "type": TYPE})
        assert refused.status_code >= 500
        retried = deliver(client, "acme", {"id": "s2", "type": TYPE})
        assert retried.status_code == 200 and retried.json["status"] == "processed"
        assert sql("SELECT count(*) FROM test_effects WHERE event_id = 's2'") == [(1,)]
        prepared = app.extensions["idemhook.db"].lanes.prepared
        assert prepared.enabled  # a schema change is not a pooler: still prepared
        claim = prepared.statements[
            app.extensions["idemhook.receiver"].claimer.statements.claim_sql
        ]
        assert _executions(app)[claim.name] == 1  # the retry's, on the new connection
    finally:
        sql("ALTER TABLE processed_events ALTER COLUMN status TYPE varchar(16)")


def test_a_freshness_sources_claim_is_prepared_from_its_second_use_and_still_refuses_stale(
    make_app, sql
):
    """A source with ``freshness`` has a claim statement of its own, made on its first
    delivery: it runs as text then, is prepared before the lane's next transaction, and
    from then on a late update is still claimed ``stale`` and an older one never applied."""
    from tests.test_freshness import FRESH_SOURCES, data_of, event

    app = make_app(FRESH_SOURCES, IDEMHOOK_PREPARED_STATEMENTS=True, IDEMHOOK_POOL_SIZE=1)
    client = app.test_client()
    assert deliver(client, "versioned", event("v1", 1)).json["status"] == "processed"
    assert deliver(client, "versioned", event("v3", 3)).json["status"] == "processed"
    late = deliver(client, "versioned", event("v2", 2))
    assert late.json["status"] == "stale"
    assert data_of(sql) == ("v3", "data of v3")
    prepared = app.extensions["idemhook.db"].lanes.prepared
    fresh = app.extensions["idemhook.receiver"].claimer.statements.fresh.claim_sql("versioned")
    assert _executions(app)[prepared.statements[fresh].name] == 2  # v3 and v2, not v1
