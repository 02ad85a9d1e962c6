"""A failure's traceback is where an operator looks: `failures show`, `--json`, `events show`."""

from __future__ import annotations

import json

from idemhook.testing import deliver


def lines(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.strip()]


def fail_once(client, sql, event_id: str) -> None:
    """Deliver ``event_id`` once with its handler failing (the recorder raises RuntimeError)."""
    sql("INSERT INTO test_failures VALUES (:e, 'CRM down')", e=event_id)
    assert deliver(client, "acme", {"id": event_id, "type": "contact.created"}).status_code == 500
    sql("DELETE FROM test_failures WHERE event_id = :e", e=event_id)


def test_failures_list_json_carries_the_traceback(client, runner, sql):
    fail_once(client, sql, "evt_tb")
    [failure] = lines(runner.invoke(args=["failures", "list", "--json"]))
    assert failure["traceback"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: CRM down" in failure["traceback"]
    table = runner.invoke(args=["failures", "list"])
    assert table.output.splitlines()[0].split()[:2] == ["ID", "FAILED_AT"]
    assert table.output.splitlines()[1].split()[0] == str(failure["id"])


def test_failures_show_prints_one_failure_with_its_traceback(client, runner, sql):
    fail_once(client, sql, "evt_one")
    [listed] = lines(runner.invoke(args=["failures", "list", "--json"]))

    shown = runner.invoke(args=["failures", "show", str(listed["id"])])
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert "event_id    evt_one" in out and "resolved    False" in out
    assert "raised RuntimeError: CRM down" in out
    traceback = out.split("\ntraceback\n", 1)[1]
    assert traceback.startswith("  Traceback (most recent call last):")
    assert "  RuntimeError: CRM down" in traceback

    [as_json] = lines(runner.invoke(args=["failures", "show", str(listed["id"]), "--json"]))
    assert as_json == listed

    missing = runner.invoke(args=["failures", "show", str(listed["id"] + 1000)])
    assert missing.exit_code == 1 and f"no failure with id {listed['id'] + 1000}" in missing.output


def test_events_show_prints_each_failures_traceback(client, runner, sql):
    fail_once(client, sql, "evt_later")
    never = runner.invoke(args=["events", "show", "acme", "evt_later"])
    [failure] = lines(runner.invoke(args=["failures", "list", "--json"]))
    assert never.exit_code == 1 and f"`idemhook failures show {failure['id']}`" in never.output

    later = deliver(client, "acme", {"id": "evt_later", "type": "contact.created"})
    assert later.status_code == 200
    human = runner.invoke(args=["events", "show", "acme", "evt_later"])
    assert human.exit_code == 0, human.output
    after = human.output.split("\nfailures ", 1)[1]
    assert f"failure {failure['id']}" in after
    assert "    Traceback (most recent call last):" in after
    assert "    RuntimeError: CRM down" in after
