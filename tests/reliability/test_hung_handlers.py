"""Handlers that hang (an API that never answers) leave the rest of the worker working.

A handler hung in Python past IDEMHOOK_HANDLER_TIMEOUT_MS is answered ``503
handler_timeout`` and its claim abandoned, but its thread (and its claim's database
connection) stays until the handler returns. The deliveries after it must still be
answered, and a failing one must still leave its ``delivery_failures`` row: the
operator's only record of what failed, and what ``idemhook failures retry`` replays.

One gunicorn worker (4 threads, so a pool of 4 + 4 connections), so the test knows
whose connections it is counting.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing

import psycopg2
import pytest

from idemhook.testing.postgres import connect_args
from tests.conftest import SECRET, SOURCES
from tests.faults import sessions
from tests.reliability.conftest import GUARD_SECONDS, signed_post, wait_for
from tests.servers import gunicorn

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

HANGING_SOURCES = {
    "plugins": [*SOURCES["plugins"], "tests.plugins.hanging"],
    "sources": {
        **SOURCES["sources"],
        "hanging": {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"},
    },
}
THREADS = 4
#: As many hung handlers as the worker has threads.
HUNG = THREADS
SETTINGS = {
    "IDEMHOOK_HANDLER_TIMEOUT_MS": "1000",
    # A guard only: no statement of this test is meant to time out.
    "IDEMHOOK_STATEMENT_TIMEOUT_MS": "30000",
}
WEB = "idemhook-web"


def test_a_failing_delivery_after_handlers_hung_is_answered_and_recorded(clean_db, sql):
    sql("INSERT INTO test_failures VALUES ('fails-1', 'the CRM refused the contact')")
    with ExitStack() as stack:
        # The API the hanging handlers call: it takes their calls and never answers.
        api = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=HUNG))
        api.settimeout(GUARD_SECONDS)
        calls: list[socket.socket] = []
        server = stack.enter_context(
            gunicorn(HANGING_SOURCES, clean_db, workers=1, threads=THREADS, env=SETTINGS)
        )
        clients = stack.enter_context(ThreadPoolExecutor(HUNG))
        # Last in, first out: the hung handlers are let go before anything waits on them.
        stack.callback(lambda: [call.close() for call in calls])

        # 1. HUNG deliveries whose handlers hang in the API: each is answered 503.
        hanging = [
            clients.submit(
                signed_post, server.url, "hanging", {"id": f"hung-{n}", "api": api.getsockname()}
            )
            for n in range(HUNG)
        ]
        calls += [api.accept()[0] for _ in range(HUNG)]
        hung = [answer.result() for answer in hanging]
        assert [(a.status_code, a.json()["error"]) for a in hung] == [
            (503, "handler_timeout")
        ] * HUNG, [a.text for a in hung]

        # 2. Then the worker serves HUNG deliveries at once, as busy traffic does: they
        # meet in their claims, held back together by the test's uncommitted claims of the
        # same events (as other deliveries of them in flight would hold them).
        holder = stack.enter_context(closing(psycopg2.connect(**connect_args(clean_db))))
        with holder.cursor() as cur:
            for n in range(HUNG):
                cur.execute(
                    "INSERT INTO processed_events (source, event_id, status, received_at, "
                    "last_seen_at) VALUES ('acme', %s, 'processed', now(), now())",
                    (f"busy-{n}",),
                )
        busy = [
            clients.submit(
                signed_post, server.url, "acme", {"id": f"busy-{n}", "type": "contact.created"}
            )
            for n in range(HUNG)
        ]
        wait_for(
            lambda: len([s for s in sessions(clean_db, WEB) if s.wait_event_type == "Lock"])
            == HUNG,
            "the busy deliveries to wait in their claims together",
        )
        holder.rollback()
        assert [a.result().json()["status"] for a in busy] == ["processed"] * HUNG

        # 3. A delivery whose handler fails.
        failed = signed_post(server.url, "acme", {"id": "fails-1", "type": "contact.created"})
        log = server.log()

    assert (failed.status_code, failed.json()["error"]) == (500, "handler_failed"), failed.text
    recorded = sql("SELECT source, event_id, error FROM delivery_failures WHERE source = 'acme'")
    assert [(r.source, r.event_id) for r in recorded] == [("acme", "fails-1")], (
        "the failed delivery left no delivery_failures row:\n" + log[-2000:]
    )
    assert "the CRM refused the contact" in recorded[0].error
    assert "could not record" not in log, log[-2000:]
    # Each hung handler's timeout is on record too.
    assert sql("SELECT event_id FROM delivery_failures WHERE source = 'hanging' ORDER BY 1") == [
        (f"hung-{n}",) for n in range(HUNG)
    ]
    # The hung handlers' work never committed; the busy deliveries' did.
    assert sql("SELECT event_id FROM processed_events ORDER BY 1") == [
        (f"busy-{n}",) for n in range(HUNG)
    ]
