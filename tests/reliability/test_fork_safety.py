"""Workers forked from a master that holds database connections never touch them.

With ``--preload`` the master builds the app, and whatever connections it opens
before forking (a start-up check, a plugin that queries at import) are copies in
every worker. Here the master delivers one event and runs one query (a kept claim
connection and a pooled one stay open, see ``master_connections``); the workers
then serve deliveries, and one of them exits and is replaced. The master's two
PostgreSQL sessions must be exactly as the master left them: a worker that used
them would interleave its statements with the master's, and one that closed them,
or let its garbage collector do so, would send a Terminate or a ROLLBACK down the
master's socket and end or change the master's session.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.reliability.conftest import GUARD_SECONDS, WHOAMI_SOURCES, signed_post, wait_for
from tests.reliability.master_connections import SNAPSHOT
from tests.servers import Server, gunicorn

pytestmark = [pytest.mark.fault, pytest.mark.gunicorn]

#: Runs in the master after the app is (pre)loaded and before any worker is forked.
HOOK = """
def when_ready(server):
    from tests.reliability.master_connections import open_connections

    open_connections(server.app.wsgi() if {preload!r} else None, {record!r})
"""


def deliver_on_every_worker(server: Server, prefix: str) -> dict[int, dict]:
    """Deliver events one at a time until every worker has answered; their results by worker."""
    results: dict[int, dict] = {}
    deadline = time.monotonic() + GUARD_SECONDS
    n = 0
    while set(results) != set(server.worker_pids()):
        assert time.monotonic() < deadline, f"only workers {sorted(results)} answered"
        n += 1
        answer = signed_post(server.url, "whoami", {"id": f"{prefix}-{n}"})
        assert answer.status_code == 200 and answer.json()["status"] == "processed", answer.text
        results[answer.json()["result"]["worker"]] = answer.json()["result"]
    return results


@pytest.mark.parametrize("preload", [True, False], ids=["--preload", "without --preload"])
def test_workers_never_touch_the_connections_their_master_opened(clean_db, sql, tmp_path, preload):
    record = tmp_path / "master.json"
    with gunicorn(
        WHOAMI_SOURCES,
        clean_db,
        config=HOOK.format(preload=preload, record=str(record)),
        args=("--preload",) if preload else (),
    ) as server:
        assert server.settings["preload_app"] is preload
        master = json.loads(record.read_text())
        assert master["pid"] == server.pid
        backends = [master["lane"], master["pooled"]]
        assert len(set(backends)) == 2

        def sessions() -> list[list]:
            rows = sql(SNAPSHOT.replace("ANY(%s)", "ANY(:pids)"), pids=backends)
            return [[pid, state, query, changed.isoformat()] for pid, state, query, changed in rows]

        # Both sessions idle, as the master left them just before it forked.
        assert [s[1] for s in master["sessions"]] == ["idle", "idle"]
        assert sessions() == master["sessions"]

        served = deliver_on_every_worker(server, "served")
        assert not {r["backend"] for r in served.values()} & set(backends)
        assert sessions() == master["sessions"]

        # A worker exits cleanly (its garbage and its finalizers run) and gunicorn forks
        # a new one from the master, which serves too.
        leaving = server.worker_pids()[0]
        os.kill(leaving, signal.SIGTERM)
        wait_for(lambda: leaving not in server.worker_pids(), "the worker to exit")
        server.wait_ready()
        replaced = deliver_on_every_worker(server, "replaced")
        assert leaving not in replaced
        assert sessions() == master["sessions"]
        log = server.log()

    assert f"Worker exiting (pid: {leaving})" in log
    # No worker met a broken connection or logged an error of any kind.
    for marker in ("Traceback", "[ERROR]", "OperationalError", "InterfaceError", "connection"):
        assert marker not in log, log
