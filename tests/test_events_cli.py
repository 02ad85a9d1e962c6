"""``idemhook events`` and ``idemhook failures`` on PostgreSQL, through the real claim path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from idemhook import create_app
from idemhook.testing import deliver, postgres
from tests.conftest import SOURCES
from tests.test_plugins import LEDGER, ledger


def seed(sql, source, event_id, *, ago, type="contact.updated", status="processed", dups=0):
    """Insert a claim row received ``ago`` before now (as if delivered then).

    "Now" is read at each call, never once per module: the filters under test read the
    clock when queried, and a slow suite can reach a test many minutes after collection.
    """
    at = datetime.now(UTC) - ago
    sql(
        "INSERT INTO processed_events (source, event_id, event_type, status, received_at, "
        "processed_at, payload, result, duplicate_count, last_seen_at) VALUES (:s, :e, :t, :st, "
        ":at, :at, CAST(:p AS jsonb), NULL, :d, :at)",
        s=source,
        e=event_id,
        t=type,
        st=status,
        at=at,
        p=json.dumps({"id": event_id, "type": type}),
        d=dups,
    )


def lines(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.strip()]


def test_list_filters_by_source_type_status_and_time(runner, sql):
    seed(sql, "acme", "old", ago=timedelta(days=3))
    seed(sql, "acme", "recent", ago=timedelta(minutes=30))
    seed(sql, "acme", "inv", ago=timedelta(minutes=20), type="invoice.paid", status="ignored")
    seed(sql, "open", "other", ago=timedelta(minutes=10), type=None)

    everything = lines(runner.invoke(args=["events", "list", "--json"]))
    assert [e["event_id"] for e in everything] == ["other", "inv", "recent", "old"]  # newest first
    assert "payload" not in everything[0] and everything[0]["source"] == "open"

    def ids(*args):
        return [
            e["event_id"] for e in lines(runner.invoke(args=["events", "list", "--json", *args]))
        ]

    assert ids("--source", "acme") == ["inv", "recent", "old"]
    assert ids("--type", "invoice.paid") == ["inv"]
    assert ids("--status", "ignored") == ["inv"]
    assert ids("--since", "2h") == ["other", "inv", "recent"]
    assert ids("--until", "1h") == ["old"]
    iso = (datetime.now(UTC) - timedelta(minutes=25)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids("--since", iso, "--source", "acme") == ["inv"]
    assert ids("--limit", "2") == ["other", "inv"]


def test_list_table_is_readable(runner, sql):
    seed(sql, "acme", "evt_table", ago=timedelta(minutes=1), dups=3)
    result = runner.invoke(args=["events", "list"])
    assert result.exit_code == 0
    header, row = result.output.splitlines()
    assert header.split() == [
        "RECEIVED_AT",
        "SOURCE",
        "EVENT_ID",
        "EVENT_TYPE",
        "STATUS",
        "DUPLICATE_COUNT",
    ]
    assert row.split()[1:] == ["acme", "evt_table", "contact.updated", "processed", "3"]


@pytest.mark.parametrize(
    "args",
    [
        ["events", "list", "--since", "yesterday"],
        ["events", "list", "--limit", "0"],
        ["events", "stats", "--by", "colour"],
        ["events", "show", "acme"],
        ["events", "replay", "acme", "x"],  # without --force
        ["events", "prune"],
        ["events", "prune", "--older-than", "soon"],
        ["failures", "retry"],
        ["failures", "retry", "acme"],
        ["failures", "list", "--until", "2026-13-45"],
    ],
)
def test_wrong_arguments_are_usage_errors(runner, args):
    result = runner.invoke(args=args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_show_prints_every_column_and_failures(client, runner, sql):
    sql("INSERT INTO test_failures VALUES ('evt_show', 'CRM down')")
    assert deliver(client, "acme", {"id": "evt_show", "type": "contact.created"}).status_code == 500
    sql("DELETE FROM test_failures")
    assert deliver(client, "acme", {"id": "evt_show", "type": "contact.created"}).status_code == 200
    deliver(client, "acme", {"id": "evt_show", "type": "contact.created"})

    [event] = lines(runner.invoke(args=["events", "show", "acme", "evt_show", "--json"]))
    columns = [
        r[0]
        for r in sql(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'processed_events'"
        )
    ]
    assert set(columns) <= set(event)
    assert event["payload"] == {"id": "evt_show", "type": "contact.created"}
    assert event["result"] == {"applied": "evt_show"}
    assert event["duplicate_count"] == 1 and event["replay_count"] == 0
    [failure] = event["failures"]
    assert "RuntimeError: CRM down" in failure["error"] and "Traceback" in failure["traceback"]

    human = runner.invoke(args=["events", "show", "acme", "evt_show"])
    assert human.exit_code == 0
    assert "duplicate_count" in human.output and "CRM down" in human.output
    # The stored headers as JSON, as the payload and the result are: not a Python dict.
    headers = human.output.split("headers", 1)[1].split("\nid ", 1)[0]
    assert '"Content-Type": "application/json"' in headers and "{'" not in headers

    missing = runner.invoke(args=["events", "show", "acme", "nope"])
    assert missing.exit_code == 1 and "no event 'nope'" in missing.output
    assert "never received, or pruned" in missing.output
    sql("INSERT INTO test_failures VALUES ('evt_bad', 'CRM down')")
    deliver(client, "acme", {"id": "evt_bad", "type": "contact.created"})
    failed = runner.invoke(args=["events", "show", "acme", "evt_bad"])
    assert failed.exit_code == 1 and "1 failed attempts and no success yet" in failed.output


def test_stats_counts_statuses_duplicates_and_failures(client, runner, sql):
    deliver(client, "acme", {"id": "s1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "s1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "s1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "s2", "type": "contact.updated"})
    deliver(client, "acme", {"id": "s3", "type": "invoice.paid"})
    sql("INSERT INTO test_failures VALUES ('s4', 'boom')")
    deliver(client, "acme", {"id": "s4", "type": "contact.updated"})
    seed(sql, "acme", "ancient", ago=timedelta(days=40))

    groups = {g["key"]: g for g in lines(runner.invoke(args=["events", "stats", "--json"]))}
    assert groups["contact.updated"]["events"] == 3
    assert groups["contact.updated"]["by_status"] == {"processed": 3}
    assert groups["contact.updated"]["duplicates"] == 2
    assert groups["contact.updated"]["failures"] == 1
    assert groups["invoice.paid"]["by_status"] == {"ignored": 1}

    recent = lines(
        runner.invoke(args=["events", "stats", "--since", "1d", "--by", "source", "--json"])
    )
    assert recent == [
        {
            "key": "acme",
            "events": 3,
            "by_status": {"processed": 2, "ignored": 1},
            "duplicates": 2,
            "failures": 1,
        }
    ]
    hours = lines(runner.invoke(args=["events", "stats", "--by", "hour", "--json"]))
    assert len(hours) == 2 and hours[0]["key"] > hours[1]["key"]  # newest hour first
    assert hours[0]["key"].endswith(":00:00Z")

    table = runner.invoke(args=["events", "stats", "--since", "1d"])
    assert table.exit_code == 0
    assert table.output.splitlines()[-1].split() == ["TOTAL", "3", "1", "2", "2", "1"]


def test_replay_reruns_handlers_once_and_records_it(client, runner, sql):
    deliver(client, "acme", {"id": "evt_r", "type": "contact.updated"})
    effects = "SELECT count(*) FROM test_effects WHERE event_id = 'evt_r'"
    assert sql(effects)[0][0] == 1

    refused = runner.invoke(args=["events", "replay", "acme", "evt_r"])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert sql(effects)[0][0] == 1

    done = runner.invoke(args=["events", "replay", "acme", "evt_r", "--force", "--json"])
    [event] = lines(done)
    assert event["replay_count"] == 1 and event["replayed_at"] is not None
    assert event["result"] == {"applied": "evt_r"}
    assert sql(effects)[0][0] == 2

    # A failing handler rolls back its own effect and the replay record.
    sql("INSERT INTO test_failures VALUES ('evt_r', 'still broken')")
    failed = runner.invoke(args=["events", "replay", "acme", "evt_r", "--force"])
    assert failed.exit_code == 1 and "RuntimeError: still broken" in failed.output
    assert sql(effects)[0][0] == 2
    assert sql("SELECT replay_count FROM processed_events WHERE event_id = 'evt_r'")[0][0] == 1

    missing = runner.invoke(args=["events", "replay", "acme", "nope", "--force"])
    assert missing.exit_code == 1 and "no event 'nope'" in missing.output


def test_failures_list_and_retry_one_through_the_claim_path(client, runner, sql):
    sql("INSERT INTO test_failures VALUES ('evt_f', 'CRM down')")
    assert deliver(client, "acme", {"id": "evt_f", "type": "contact.created"}).status_code == 500
    assert deliver(client, "acme", {"id": "ok", "type": "contact.created"}).status_code == 200

    [failure] = lines(runner.invoke(args=["failures", "list", "--json"]))
    assert failure["event_id"] == "evt_f" and failure["resolved"] is False

    still = runner.invoke(args=["failures", "retry", "acme", "evt_f"])
    assert still.exit_code == 1 and "failed" in still.output
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == 2  # the retry failed too

    sql("DELETE FROM test_failures")
    retried = runner.invoke(args=["failures", "retry", "acme", "evt_f", "--json"])
    [result] = lines(retried)
    assert result == {
        "source": "acme",
        "event_id": "evt_f",
        "status": "processed",
        "detail": {"applied": "evt_f"},
    }
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'evt_f'")[0][0] == 1
    [row] = sql("SELECT status, duplicate_count FROM processed_events WHERE event_id = 'evt_f'")
    assert tuple(row) == ("processed", 0)

    again = lines(runner.invoke(args=["failures", "retry", "acme", "evt_f", "--json"]))
    assert again[0]["status"] == "skipped"
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'evt_f'")[0][0] == 1
    assert lines(runner.invoke(args=["failures", "list", "--pending", "--json"])) == []
    assert all(f["resolved"] for f in lines(runner.invoke(args=["failures", "list", "--json"])))


def test_failures_retry_all_retries_each_pending_event_of_a_batch_once(client, runner, sql):
    sql("INSERT INTO test_failures VALUES ('b1', 'x'), ('h1', 'y')")
    batch = [{"id": f"b{i}", "type": "contact.updated"} for i in range(3)]
    assert deliver(client, "batched", batch).status_code == 500
    response = client.post("/webhooks/open", json={"n": 1}, headers={"X-Event-Id": "h1"})
    assert response.status_code == 500
    sql("DELETE FROM test_failures")

    results = lines(runner.invoke(args=["failures", "retry", "--all", "--since", "1h", "--json"]))
    assert sorted((r["source"], r["event_id"], r["status"]) for r in results) == [
        ("batched", "b1", "processed"),
        ("open", "h1", "processed"),  # event ID read from the stored header
    ]
    effects = dict(sql("SELECT event_id, count(*) FROM test_effects GROUP BY event_id"))
    assert effects == {"b0": 1, "b1": 1, "b2": 1, "h1": 1}
    # b0 and b2 were not claimed again: no duplicate counted by the retry.
    assert sql("SELECT max(duplicate_count) FROM processed_events")[0][0] == 0

    nothing = runner.invoke(args=["failures", "retry", "--all"])
    assert nothing.exit_code == 0 and "nothing to retry" in nothing.output


def test_prune_deletes_in_batches_and_keeps_recent_rows(runner, sql):
    for i in range(5):
        seed(sql, "acme", f"old{i}", ago=timedelta(days=40))
    seed(sql, "acme", "young", ago=timedelta(days=1))
    for days in (40, 41, 42, 1):
        sql(
            "INSERT INTO delivery_failures (source, event_id, error, raw_body, failed_at) "
            "VALUES ('acme', :e, 'x raised E', '\\x7b7d', now() - make_interval(days => :d))",
            e=f"failed{days}",
            d=days,
        )

    dry = runner.invoke(args=["events", "prune", "--older-than", "30d", "--dry-run"])
    assert dry.exit_code == 0 and "would prune 5 events and 3 failures" in dry.output
    assert sql("SELECT count(*) FROM processed_events")[0][0] == 6

    done = runner.invoke(args=["events", "prune", "--older-than", "30d", "--batch-size", "2"])
    assert done.exit_code == 0, done.output
    # 5 events in batches of 2, 2, 1; 3 failures in batches of 2, 1.
    assert "pruned 5 events and 3 failures" in done.output and "in 5 batches" in done.output
    assert [r[0] for r in sql("SELECT event_id FROM processed_events")] == ["young"]
    assert [r[0] for r in sql("SELECT event_id FROM delivery_failures")] == ["failed1"]


def test_split_retention_drops_payloads_but_keeps_the_dedupe_memory(client, runner, sql):
    seed(sql, "acme", "evt_p", ago=timedelta(days=10))
    sql("INSERT INTO test_failures VALUES ('evt_q', 'x')")
    deliver(client, "acme", {"id": "evt_q", "type": "contact.updated"})
    sql("UPDATE delivery_failures SET failed_at = now() - interval '10 days'")
    seed(sql, "acme", "fresh", ago=timedelta(hours=1))

    result = runner.invoke(args=["events", "prune", "--older-than", "7d", "--payloads-only"])
    assert result.exit_code == 0, result.output
    assert "payloads of 1 events and 1 failures" in result.output
    rows = dict(sql("SELECT event_id, payload FROM processed_events"))
    assert rows == {"evt_p": None, "fresh": {"id": "fresh", "type": "contact.updated"}}
    [failure] = sql("SELECT payload, raw_body FROM delivery_failures")
    assert failure.payload is None and bytes(failure.raw_body) == b""

    # The claim survives: a late provider retry is still a duplicate, not a second application.
    late = deliver(client, "acme", {"id": "evt_p", "type": "contact.updated"})
    assert late.json["status"] == "duplicate"
    refused = runner.invoke(args=["events", "replay", "acme", "evt_p", "--force"])
    assert refused.exit_code == 1 and "pruned" in refused.output
    sql("DELETE FROM test_failures")
    no_body = runner.invoke(args=["failures", "retry", "acme", "evt_q"])
    assert no_body.exit_code == 1 and "pruned" in no_body.output


def test_short_retention_warns_about_provider_retries(runner, sql):
    result = runner.invoke(args=["events", "prune", "--older-than", "1d", "--dry-run"])
    assert result.exit_code == 0
    assert "shorter than the longest provider retry window" in result.output


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "args",
    [
        ["events", "list"],
        ["events", "show", "acme", "x"],
        ["events", "stats"],
        ["events", "prune", "--older-than", "30d"],
        ["events", "replay", "acme", "x", "--force"],
        ["failures", "list"],
        ["failures", "retry", "acme", "x"],
    ],
)
def test_unreachable_database_is_one_line_without_traceback(db_url, args):
    url = db_url.set(host="127.0.0.1", port=closed_port())
    app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": SOURCES})
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach the database")
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_console_script_reports_an_unreachable_database_in_one_line(db_url, tmp_path):
    config = tmp_path / "webhooks.toml"
    config.write_text("")
    url = db_url.set(host="127.0.0.1", port=closed_port())
    result = subprocess.run(
        [str(Path(sys.executable).parent / "idemhook"), "events", "list", "--since", "2h"],
        env={
            **os.environ,
            "DATABASE_URL": url.render_as_string(hide_password=False),
            "IDEMHOOK_CONFIG": str(config),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot reach the database")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_times_with_an_offset_are_the_same_instant_in_utc():
    from idemhook._store.queries import parse_when

    assert parse_when("2026-11-01T02:00+02:00") == datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    assert parse_when("2026-11-01T00:00") == parse_when("2026-11-01T00:00Z")
    now = datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_when("90m", now) == datetime(2026, 10, 31, 22, 30, tzinfo=UTC)


def test_database_without_the_schema_says_to_upgrade(pg_server):
    url = postgres.create_database(pg_server)
    try:
        app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": SOURCES})
        result = app.test_cli_runner().invoke(args=["events", "list"])
        assert result.exit_code == 1
        assert "schema is missing or behind" in result.output
        assert "idemhook db upgrade" in result.output and "Traceback" not in result.output
        app.extensions["idemhook.db"].engine.dispose()
    finally:
        postgres.drop_database(url)


def test_a_retry_after_its_claim_was_pruned_is_applied_again(client, runner, sql):
    # Why docs/querying.md says retention must outlast the providers' retry windows.
    deliver(client, "acme", {"id": "late", "type": "contact.updated"})
    sql("UPDATE processed_events SET received_at = now() - interval '31 days'")
    pruned = runner.invoke(args=["events", "prune", "--older-than", "30d"])
    assert "pruned 1 events" in pruned.output
    again = deliver(client, "acme", {"id": "late", "type": "contact.updated"})
    assert again.json["status"] == "processed"
    assert sql("SELECT count(*) FROM test_effects WHERE event_id = 'late'")[0][0] == 2


def test_replay_honours_the_handler_outcomes(idemhook):
    kit = idemhook(LEDGER)
    runner = kit.app.test_cli_runner()
    assert kit.deliver("shop", {"id": "r1", "type": "order.paid"}).json["status"] == "processed"

    def replay():
        return runner.invoke(args=["events", "replay", "shop", "r1", "--force", "--json"])

    # The stored payload now makes `second` reject: the replay is refused, nothing changes.
    kit.sql('UPDATE processed_events SET payload = payload || \'{"second": "reject"}\'')
    rejected = replay()
    assert rejected.exit_code == 1
    assert "a handler rejected the event (unknown currency); nothing was changed" in rejected.output
    assert ledger(kit, "r1") == ["audit", "first", "second"]
    assert kit.row("shop", "r1").replay_count == 0

    # Ignore (returned, or raised deep inside) is a result like any other.
    kit.sql(
        "UPDATE processed_events SET payload = payload || "
        '\'{"first": "ignore-deep", "second": "ignore"}\''
    )
    [event] = [json.loads(line) for line in replay().output.splitlines()]
    assert event["status"] == "processed" and event["replay_count"] == 1
    assert event["result"]["tests.plugins.ledger:first"] == {"ignored": "a test order"}
    assert event["result"]["tests.plugins.ledger:second"] == {"ignored": "second ignores it"}
