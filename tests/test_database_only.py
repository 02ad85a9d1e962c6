"""``@handler(..., database_only=True)``: a delivery whose handlers all do only database work
runs on the request thread, without the claim thread's hand-off; any other runs watched.

What a user would notice: which thread ran the handler (the watch's ``503 handler_timeout``
needs the claim thread), that exactly once holds either way, and that a database-only
handler stuck in SQL is still answered, by the database's own timeouts.
"""

from __future__ import annotations

import threading

import psycopg2

from idemhook.testing import deliver
from idemhook.testing.postgres import connect_args
from tests.conftest import SOURCES
from tests.plugins.database_only import LOCK_KEY

PLUGINS = {**SOURCES, "plugins": ["tests.plugins.database_only"]}
CLAIM_THREAD = "idemhook-claim"


def effects(sql, event_id):
    return sql("SELECT count(*) FROM test_effects WHERE event_id = :e", e=event_id)[0][0]


def test_only_a_delivery_whose_every_handler_is_database_only_skips_the_claim_thread(make_app, sql):
    client = make_app(PLUGINS).test_client()
    here = threading.current_thread().name  # the test client runs the app on this thread

    inline = deliver(client, "acme", {"id": "d-1", "type": "where.database_only"})
    assert inline.status_code == 200, inline.json
    assert inline.json["result"] == {"thread": here}
    assert here != CLAIM_THREAD

    watched = deliver(client, "acme", {"id": "w-1", "type": "where.watched"})
    assert watched.json["result"] == {"thread": CLAIM_THREAD}

    # One handler that does not say so puts the whole delivery on the claim thread.
    mixed = deliver(client, "acme", {"id": "m-1", "type": "where.mixed"})
    assert set(mixed.json["result"]) == {
        "tests.plugins.database_only:mixed_database_only",
        "tests.plugins.database_only:mixed_watched",
    }
    assert {r["thread"] for r in mixed.json["result"].values()} == {CLAIM_THREAD}

    # Exactly once either way: the retry is a duplicate answered with the stored result.
    again = deliver(client, "acme", {"id": "d-1", "type": "where.database_only"})
    assert again.json == {"status": "duplicate", "event_id": "d-1", "result": {"thread": here}}
    assert effects(sql, "d-1") == 1


def test_a_database_only_handler_stuck_in_sql_is_answered_by_the_lock_timeout(
    make_app, sql, db_url
):
    client = make_app(PLUGINS, IDEMHOOK_STATEMENT_TIMEOUT_MS=300).test_client()
    holder = psycopg2.connect(**connect_args(db_url))
    holder.autocommit = True
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        stuck = deliver(client, "acme", {"id": "l-1", "type": "where.locked"})
    finally:
        holder.close()
    # Answered, with nothing kept: the provider's retry runs it again.
    assert stuck.status_code == 500, stuck.json
    assert stuck.json["error"] == "handler_failed"
    assert effects(sql, "l-1") == 0
    assert sql("SELECT count(*) FROM processed_events WHERE event_id = 'l-1'")[0][0] == 0

    retried = deliver(client, "acme", {"id": "l-1", "type": "where.locked"})
    assert retried.status_code == 200 and retried.json["status"] == "processed"
    assert effects(sql, "l-1") == 1


def test_handlers_list_says_which_handlers_run_without_the_claim_thread(make_app):
    listed = make_app(PLUGINS).test_cli_runner().invoke(args=["handlers", "list"]).output
    lines = {line.split()[2]: line for line in listed.splitlines() if "database_only:" in line}
    flag = "(database_only=True: runs without the claim thread's watch)"
    assert flag in lines["tests.plugins.database_only:database_only"]
    assert flag in lines["tests.plugins.database_only:locked"]
    assert flag not in lines["tests.plugins.database_only:watched"]
