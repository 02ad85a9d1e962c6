"""`idemhook outbox list/show/retry/prune`, `GET /outbox` and the outbox metrics (PostgreSQL)."""

from __future__ import annotations

import json

import pytest

from idemhook.testing import deliver
from tests.test_api import AUTH, TOKEN
from tests.test_outbox import MAIL_SOURCES


@pytest.fixture
def app(make_app):
    """The receiver with the mail source and the read API enabled."""
    return make_app(MAIL_SOURCES, IDEMHOOK_ADMIN_TOKEN=TOKEN)


@pytest.fixture
def three(client, sql):
    """Three messages from three events: m1 pending, m2 sent, m3 dead."""
    for event_id in ("m1", "m2", "m3"):
        assert deliver(client, "mail", {"id": event_id}).status_code == 200
    sql(
        "UPDATE outbox_messages SET status = 'sent', attempts = 1, sent_at = now(), "
        "result = '{\"smtp\": \"250 ok\"}' WHERE event_id = 'm2'"
    )
    sql(
        "UPDATE outbox_messages SET status = 'dead', attempts = 8, "
        "last_error = 'send_email raised ConnectionRefusedError: down' WHERE event_id = 'm3'"
    )
    return {r.event_id: r.id for r in sql("SELECT id, event_id FROM outbox_messages")}


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def test_list_shows_newest_first_and_filters(runner, three):
    result = runner.invoke(args=["outbox", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = lines(result.output)
    assert [r["event_id"] for r in rows] == ["m3", "m2", "m1"]
    assert set(rows[0]) >= {"id", "kind", "key", "status", "attempts", "next_attempt_at"}
    assert "payload" not in rows[0]
    dead = lines(runner.invoke(args=["outbox", "list", "--status", "dead", "--json"]).output)
    assert [r["id"] for r in dead] == [three["m3"]]
    table = runner.invoke(args=["outbox", "list", "--kind", "email"]).output
    assert table.splitlines()[0].split()[:4] == ["ID", "CREATED_AT", "KIND", "STATUS"]
    assert len(table.splitlines()) == 4
    assert runner.invoke(args=["outbox", "list", "--status", "lost"]).exit_code == 2


def test_show_prints_every_column(runner, three):
    result = runner.invoke(args=["outbox", "show", str(three["m2"]), "--json"])
    [row] = lines(result.output)
    assert row["result"] == {"smtp": "250 ok"} and row["payload"]["subject"] == "event m2"
    assert row["key"] == "mail:m2:0" and row["status"] == "sent"
    text = runner.invoke(args=["outbox", "show", str(three["m3"])]).output
    assert "ConnectionRefusedError: down" in text
    missing = runner.invoke(args=["outbox", "show", "999999"])
    assert missing.exit_code == 1 and "no outbox message with id 999999" in missing.output


def test_retry_makes_dead_messages_due_and_refuses_sent_ones(runner, sql, three):
    result = runner.invoke(args=["outbox", "retry", str(three["m3"]), str(three["m2"]), "--json"])
    assert result.exit_code == 1  # one was refused
    assert lines(result.output) == [
        {"id": three["m3"], "status": "retrying", "detail": "was dead; due now"},
        {"id": three["m2"], "status": "refused", "detail": "already sent"},
    ]
    [row] = sql(
        "SELECT status, attempts, next_attempt_at <= now() AS due, last_error "
        "FROM outbox_messages WHERE id = :id",
        id=three["m3"],
    )
    assert (row.status, row.attempts, row.due) == ("pending", 0, True)
    assert "ConnectionRefusedError" in row.last_error  # what went wrong stays readable


def test_retry_dead_takes_every_dead_message_and_a_held_one_is_refused(runner, sql, three):
    sql("UPDATE outbox_messages SET status = 'dead' WHERE id = :id", id=three["m1"])
    result = runner.invoke(args=["outbox", "retry", "--dead", "--kind", "email"])
    assert result.exit_code == 0, result.output
    assert result.output.count("retrying") == 2
    sql(
        "UPDATE outbox_messages SET leased_by = 'host:1:1', "
        "next_attempt_at = now() + interval '1 minute' WHERE id = :id",
        id=three["m1"],
    )
    held = runner.invoke(args=["outbox", "retry", str(three["m1"])])
    assert held.exit_code == 1 and "a worker is sending it now (host:1:1)" in held.output
    assert runner.invoke(args=["outbox", "retry"]).exit_code == 2
    assert runner.invoke(args=["outbox", "retry", "--dead"]).output == "nothing to retry\n"


def test_prune_deletes_old_sent_messages_and_never_pending_ones(runner, sql, three):
    sql("UPDATE outbox_messages SET created_at = now() - interval '10 days'")
    dry = runner.invoke(args=["outbox", "prune", "--older-than", "7d", "--dry-run"])
    assert "would prune 1 sent messages" in dry.output
    assert sql("SELECT count(*) FROM outbox_messages") == [(3,)]
    done = runner.invoke(args=["outbox", "prune", "--older-than", "7d", "--include-dead"])
    assert done.exit_code == 0 and "pruned 1 sent and 1 dead messages" in done.output
    assert [r.event_id for r in sql("SELECT event_id FROM outbox_messages")] == ["m1"]
    bad = runner.invoke(args=["outbox", "prune", "--older-than", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output


# -- the read API ----------------------------------------------------------------------------


def test_get_outbox_pages_with_a_cursor_and_filters(client, three):
    first = client.get("/outbox?limit=2", headers=AUTH)
    assert first.status_code == 200
    assert [m["event_id"] for m in first.json["messages"]] == ["m3", "m2"]
    second = client.get(f"/outbox?limit=2&cursor={first.json['next']}", headers=AUTH)
    assert [m["event_id"] for m in second.json["messages"]] == ["m1"]
    assert second.json["next"] is None
    dead = client.get("/outbox?status=dead&kind=email&source=mail", headers=AUTH).json
    assert [m["id"] for m in dead["messages"]] == [three["m3"]]


def test_get_outbox_id_shows_one_message(client, three):
    shown = client.get(f"/outbox/{three['m2']}", headers=AUTH)
    assert shown.status_code == 200
    assert shown.json["result"] == {"smtp": "250 ok"} and shown.json["status"] == "sent"
    for path in ("/outbox/999999", "/outbox/abc", "/outbox/99999999999999999999"):
        missing = client.get(path, headers=AUTH)
        assert missing.status_code == 404 and missing.json["error"] == "message_not_found"


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("status=lost", "invalid_parameter"),
        ("limit=0", "invalid_parameter"),
        ("cursor=nonsense", "invalid_cursor"),
        ("since=yesterday", "invalid_parameter"),
        ("colour=red", "invalid_parameter"),
    ],
)
def test_get_outbox_refuses_bad_parameters_with_a_stable_code(client, query, code):
    response = client.get(f"/outbox?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.json["error"] == code


def test_the_outbox_routes_need_the_admin_token(client, three):
    for path in ("/outbox", f"/outbox/{three['m1']}"):
        refused = client.get(path)
        assert refused.status_code == 401 and "mail:m1" not in refused.get_data(as_text=True)


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_count_pending_and_dead_messages_and_the_oldest_pending_age(client, sql, three):
    sql("UPDATE outbox_messages SET created_at = now() - interval '90 seconds' WHERE id = :id",
        id=three["m1"])
    text = client.get("/metrics").get_data(as_text=True)
    assert 'idemhook_outbox_messages{status="pending"} 1.0' in text
    assert 'idemhook_outbox_messages{status="dead"} 1.0' in text
    [age] = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("idemhook_outbox_oldest_pending_age_seconds ")
    ]
    assert 90 <= age < 3600


def test_readyz_does_not_depend_on_any_worker(client, three):
    assert client.get("/readyz").json["status"] == "ok"  # no worker runs, messages wait


def test_outbox_answers_match_openapi_yaml(client, three):
    from tests.test_openapi_routes import conforms

    conforms(client.get("/outbox", headers=AUTH), "/outbox")
    conforms(client.get("/outbox?status=nope", headers=AUTH), "/outbox")
    conforms(client.get(f"/outbox/{three['m2']}", headers=AUTH), "/outbox/{id}")
    conforms(client.get("/outbox/0", headers=AUTH), "/outbox/{id}")
    conforms(client.get("/outbox"), "/outbox")
