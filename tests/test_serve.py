"""``idemhook serve``: gunicorn with the shipped settings, from any directory."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from idemhook._web import gunicorn_conf
from idemhook.testing import postgres
from tests.servers import ROOT, START_TIMEOUT, free_port, launch

pytestmark = pytest.mark.gunicorn

IDEMHOOK = str(Path(sys.executable).with_name("idemhook"))

PLUGIN = '''
from idemhook import handler


@handler("shop", "order.*")
def paid(event, db):
    return {"order": event.payload["order"]}
'''

SOURCES = '''
plugins = ["shop_plugin"]

[sources.shop]
scheme = "hmac-sha256"
secret = "env:SHOP_WEBHOOK_SECRET"
event_id = "body:id"
event_type = "body:type"
'''


@pytest.fixture
def database(pg_server: URL) -> Iterator[str]:
    """An empty database of its own; the test migrates it with `idemhook db upgrade`."""
    url = postgres.create_database(pg_server, prefix="idemhook_serve")
    yield url.render_as_string(hide_password=False)
    postgres.drop_database(url)


def test_serve_from_a_plugins_own_directory(tmp_path: Path, database: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "shop_plugin.py").write_text(PLUGIN)
    (project / "webhooks.toml").write_text(SOURCES)
    (project / "order.json").write_text('{"id": "evt_1", "type": "order.paid", "order": 7}')
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DATABASE_URL": database,
        "SHOP_WEBHOOK_SECRET": "a-secret-of-at-least-16-bytes",
        "PORT": str(port),
        "WEB_CONCURRENCY": "3",
        "WEB_THREADS": "5",
    }
    upgrade = subprocess.run(
        [IDEMHOOK, "db", "upgrade"], cwd=project, env=env, capture_output=True, text=True
    )
    assert upgrade.returncode == 0, upgrade.stderr

    # Extra arguments go to gunicorn: here its configuration dump, to see what it runs with.
    server = launch(
        [IDEMHOOK, "serve", "--log-level", "debug", "--graceful-timeout", "5"],
        url=f"http://127.0.0.1:{port}",
        env=env,
        log_path=tmp_path / "serve.log",
        cwd=project,
    )
    try:
        server.wait_ready()
        sent = subprocess.run(
            [IDEMHOOK, "send", "shop", "order.json", "--url", server.url],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.splitlines() == [
            "HTTP 200",
            '{"event_id":"evt_1","result":{"order":7},"status":"processed"}',
        ]
        deadline = time.monotonic() + START_TIMEOUT
        while len(server.worker_pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling, bounded by the deadline
        assert len(server.worker_pids()) == 3  # WEB_CONCURRENCY
        text = server.log()
        assert "Using worker: gthread" in text
        assert f"Listening at: http://0.0.0.0:{port}" in text  # PORT
        assert "  threads: 5\n" in text  # WEB_THREADS
        assert "  graceful_timeout: 5\n" in text  # the extra argument won over the settings
        assert "  keepalive: 5\n" in text and "  timeout: 30\n" in text  # the shipped settings
    finally:
        server.stop()


def test_serve_with_a_broken_configuration_says_so_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    done = subprocess.run(
        [IDEMHOOK, "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("Error: DATABASE_URL is not set")
    assert len(done.stderr.splitlines()) == 1


def test_the_repositorys_gunicorn_conf_is_the_packaged_settings() -> None:
    loaded = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    for name in gunicorn_conf.__all__:
        assert loaded[name] is getattr(gunicorn_conf, name), name
