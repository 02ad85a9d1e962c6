"""Pausing a source: deliveries are answered at once and wait; resume applies them in order."""

from __future__ import annotations

import copy

import pytest
import requests

from idemhook._engine.applier import apply_due
from idemhook.testing import signed
from tests.conftest import SECRET, SOURCES
from tests.servers import gunicorn, worker

#: The test sources and an asynchronous one, whose worker rounds show the worker ran.
WITH_QUEUE = copy.deepcopy(SOURCES)
WITH_QUEUE["plugins"].append("tests.plugins.queued")
for _name in ("queued", "queued_batch", "ordered"):  # the plugin's sources
    WITH_QUEUE["sources"][_name] = {
        "scheme": "hmac-sha256",
        "secret": SECRET,
        "event_id": "body:id",
        "event_type": "body:type",
        "mode": "async",
    }


def effects(sql) -> list[str]:
    """The events whose handlers ran, in the order they ran (the heap's insertion order)."""
    return [event_id for (event_id,) in sql("SELECT event_id FROM test_effects ORDER BY ctid")]


def test_a_paused_source_answers_at_once_and_runs_its_handlers_after_resume(app, sql):
    client, runner = app.test_client(), app.test_cli_runner()
    paused = runner.invoke(args=["sources", "pause", "acme", "--reason", "CRM down"])
    assert paused.exit_code == 0, paused.output
    assert "paused acme" in paused.output
    ids = [f"p-{n}" for n in range(5)]
    for event_id in ids:
        _, body, headers = signed(app, "acme", {"id": event_id, "type": "contact.updated"})
        response = client.post("/webhooks/acme", data=body, headers=headers)
        assert response.status_code == 202
        assert response.get_json()["status"] == "accepted"
    # A retry of a waiting event is answered the same, and claimed once.
    _, body, headers = signed(app, "acme", {"id": "p-0", "type": "contact.updated"})
    assert client.post("/webhooks/acme", data=body, headers=headers).status_code == 202
    assert apply_due(app) == 0  # the worker leaves a paused source's events alone
    assert effects(sql) == []
    statuses = sql("SELECT status, count(*) FROM processed_events GROUP BY status")
    assert statuses == [("received", 5)]
    # Shown where an operator looks.
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'idemhook_source_paused{source="acme"} 1.0' in metrics
    assert 'idemhook_source_paused{source="batched"} 0.0' in metrics
    listing = runner.invoke(args=["sources"])
    assert "PAUSED" in listing.output and "CRM down" in listing.output

    resumed = runner.invoke(args=["sources", "resume", "acme"])
    assert resumed.exit_code == 0, resumed.output
    assert apply_due(app) == 5
    assert effects(sql) == ids  # each once, in receipt order
    assert apply_due(app) == 0
    statuses = sql("SELECT status, count(*) FROM processed_events GROUP BY status")
    assert statuses == [("processed", 5)]


def test_pause_refuses_a_source_that_is_not_configured(runner, sql):
    result = runner.invoke(args=["sources", "pause", "nope"])
    assert result.exit_code != 0
    assert "no webhook source named 'nope'" in result.output
    assert sql("SELECT count(*) FROM source_pauses")[0][0] == 0


@pytest.mark.gunicorn
def test_every_instance_pauses_and_resume_applies_in_order(make_app, db_url, sql):
    app = make_app(WITH_QUEUE)  # signs, runs the commands, empties the tables afterwards
    runner = app.test_cli_runner()

    def post(server, source: str, event_id: str) -> requests.Response:
        _, body, headers = signed(app, source, {"id": event_id, "type": "contact.updated"})
        return requests.post(
            f"{server.url}/webhooks/{source}", data=body, headers=headers, timeout=30
        )

    # Two instances (one process each, so an answer says what that process knows) and a
    # worker, on one database.
    with (
        gunicorn(WITH_QUEUE, db_url, workers=1) as one,
        gunicorn(WITH_QUEUE, db_url, workers=1) as two,
        worker(WITH_QUEUE, db_url),
    ):
        instances = (one, two)
        for server in instances:
            assert post(server, "acme", f"before-{server.url}").json()["status"] == "processed"
        assert runner.invoke(args=["sources", "pause", "acme"]).exit_code == 0
        # Each instance reads the pause within a second: deliveries until it answers
        # accepted (bounded; once it has, it holds the pause until it reads a resume).
        for k, server in enumerate(instances):
            n = 0
            while post(server, "acme", f"probe-{k}-{n}").status_code != 202:
                n += 1
                assert n < 20_000, "the pause never reached the instance"
        ids = [f"paused-{k}" for k in range(20)]
        for k, event_id in enumerate(ids):
            response = post(instances[k % 2], "acme", event_id)
            assert response.status_code == 202, response.text
            assert response.json()["status"] == "accepted"
        # The worker takes due events oldest first: once it has applied an event received
        # after all of them, it has looked at the paused ones and left them.
        assert post(one, "queued", "after").status_code == 202
        while not sql("SELECT 1 FROM test_applied WHERE event_id = 'after'"):
            pass  # the exact signal: the row the worker's handler writes
        assert [e for e in effects(sql) if e.startswith("paused-")] == []
        assert runner.invoke(args=["sources", "resume", "acme"]).exit_code == 0
        while sql("SELECT count(*) FROM event_queue WHERE source = 'acme'")[0][0]:
            pass  # the worker empties the queue
        applied = [e for e in effects(sql) if e.startswith("paused-")]
        assert applied == ids  # each once, in receipt order
        counts = sql("SELECT event_id, count(*) FROM test_effects GROUP BY event_id")
        assert all(count == 1 for _, count in counts)


@pytest.mark.gunicorn
def test_a_worker_of_synchronous_sources_applies_a_paused_source_after_resume(app, db_url, sql):
    runner, client = app.test_cli_runner(), app.test_client()
    assert runner.invoke(args=["sources", "pause", "acme"]).exit_code == 0
    ids = [f"held-{n}" for n in range(3)]
    for event_id in ids:
        _, body, headers = signed(app, "acme", {"id": event_id, "type": "contact.updated"})
        assert client.post("/webhooks/acme", data=body, headers=headers).status_code == 202
    # No sender, no asynchronous source: the worker runs because a source is paused.
    with worker(SOURCES, db_url):
        assert runner.invoke(args=["sources", "resume", "acme"]).exit_code == 0
        while sql("SELECT count(*) FROM event_queue")[0][0]:
            pass  # the worker empties the queue (woken by the resume's NOTIFY)
    assert effects(sql) == ids
