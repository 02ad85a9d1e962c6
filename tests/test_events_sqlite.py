"""The operator CLI also works on the SQLite demo database."""

from __future__ import annotations

import json

import pytest

from idemhook.testing import deliver


@pytest.fixture
def db_url(sqlite_url):
    """The demo backend."""
    return sqlite_url


def _json(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_cli_round_trip_on_sqlite(client, runner, sql):
    deliver(client, "acme", {"id": "q1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "q1", "type": "contact.updated"})
    sql("INSERT INTO test_failures VALUES ('q2', 'down')")
    deliver(client, "acme", {"id": "q2", "type": "contact.updated"})
    sql("DELETE FROM test_failures")

    [event] = _json(runner.invoke(args=["events", "list", "--since", "1h", "--json"]))
    assert event["event_id"] == "q1" and event["received_at"].endswith("Z")
    [shown] = _json(runner.invoke(args=["events", "show", "acme", "q1", "--json"]))
    assert shown["duplicate_count"] == 1 and shown["payload"]["id"] == "q1"
    [hour] = _json(runner.invoke(args=["events", "stats", "--by", "hour", "--json"]))
    assert hour["events"] == 1 and hour["failures"] == 1 and hour["key"].endswith(":00:00Z")
    [replayed] = _json(runner.invoke(args=["events", "replay", "acme", "q1", "--force", "--json"]))
    assert replayed["replay_count"] == 1
    [retried] = _json(runner.invoke(args=["failures", "retry", "--all", "--json"]))
    assert retried["status"] == "processed"
    pruned = runner.invoke(args=["events", "prune", "--older-than", "30d"])
    assert pruned.exit_code == 0 and "pruned 0 events" in pruned.output
    assert sql("SELECT count(*) FROM test_effects")[0][0] == 3  # q1, its replay, q2
