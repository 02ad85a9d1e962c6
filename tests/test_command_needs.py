"""What each command needs: only the settings it uses (docs/operations.md).

Run as a user runs them: the console script, in a directory of its own, with nothing
in its environment but PATH, HOME and what the test names.

- ``db upgrade/current/downgrade``: ``DATABASE_URL`` and the plugins' list, not a single
  source's secret (a release phase or CI migrates without production webhook secrets);
- ``sign``, ``send``, ``sources``, ``sources check``, ``handlers list``: no database;
- ``sources check`` refuses every mistake ``serve`` refuses, naming all of them at once.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from idemhook.testing import postgres
from tests.conftest import SOURCES
from tests.servers import toml
from tests.test_cli import run

#: The test sources (the recorder's handlers name them), acme's secret from the environment.
GOOD = toml(
    {**SOURCES, "sources": {**SOURCES["sources"],
                            "acme": {**SOURCES["sources"]["acme"], "secret": "env:ACME_SECRET"}}}
)
ROOT = Path(__file__).resolve().parent.parent


def _env(**settings: str) -> dict[str, str]:
    # The repository's own test plugins import from the clone.
    return {"PYTHONPATH": str(ROOT), **settings}


def test_db_upgrade_needs_the_database_url_and_no_source_secret(pg_server, tmp_path):
    (tmp_path / "webhooks.toml").write_text(
        GOOD.replace("tests.plugins.recorder", "tests.plugins.ledger")
    )  # ACME_SECRET is not set, and the ledger plugin brings migrations of its own
    url = postgres.create_database(pg_server)
    try:
        env = _env(DATABASE_URL=url.render_as_string(hide_password=False))
        done = run("db", "upgrade", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        assert "ACME_SECRET" not in done.stderr
        engine = create_engine(url)
        tables = set(inspect(engine).get_table_names())
        engine.dispose()
        assert {"processed_events", "outbox_messages", "ledger"} <= tables
        current = run("db", "current", cwd=tmp_path, env=env)
        assert current.returncode == 0 and "(up to date)" in current.stdout, current.stderr
    finally:
        postgres.drop_database(url)


def test_commands_that_use_no_database_run_without_database_url(tmp_path):
    (tmp_path / "webhooks.toml").write_text(GOOD)
    (tmp_path / "event.json").write_text('{"id": "evt_1", "type": "contact.created"}')
    env = _env(ACME_SECRET="acme-secret-0123456789abcdef")
    for args in (("sources",), ("sources", "check"), ("handlers", "list"),
                 ("sign", "acme", "event.json")):
        done = run(*args, cwd=tmp_path, env=env)
        assert done.returncode == 0, (args, done.stderr)
        assert "DATABASE_URL" not in done.stderr, args
    assert "ok: 3 source(s)" in run("sources", "check", cwd=tmp_path, env=env).stdout
    signed = run("sign", "acme", "event.json", cwd=tmp_path, env=env).stdout
    assert signed.startswith("curl ") and "X-Signature: sha256=" in signed


def test_send_needs_no_database(tmp_path):
    (tmp_path / "webhooks.toml").write_text(GOOD)
    (tmp_path / "event.json").write_text('{"id": "evt_1", "type": "contact.created"}')
    received: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "body": body, "sig": self.headers["X-Signature"]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"status": "processed"}).encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        done = run(
            "send", "acme", "event.json", "--url", f"http://127.0.0.1:{server.server_port}",
            cwd=tmp_path, env=_env(ACME_SECRET="acme-secret-0123456789abcdef"),
        )
    finally:
        thread.join(timeout=10)
        server.server_close()
    assert done.returncode == 0, done.stderr
    [request] = received
    assert request["path"] == "/webhooks/acme" and request["sig"].startswith("sha256=")


@pytest.mark.parametrize(
    ("mistake", "named"),
    [
        ('plugin = ["tests.plugins.recorder"]\n', "unknown top-level key(s) plugin"),
        ('plugins = ["tests.plugins.no_such_module"]\n', "'tests.plugins.no_such_module'"),
        ("[outbox.receipt]\nmax_attempt = 3\n", "[outbox.receipt]: unknown key(s) max_attempt"),
    ],
)
def test_sources_check_fails_on_each_mistake_serve_refuses(tmp_path, mistake, named):
    body = GOOD.split("\n", 1)[1] if "plugin" in mistake else GOOD
    (tmp_path / "webhooks.toml").write_text(mistake + body)
    env = _env(ACME_SECRET="acme-secret-0123456789abcdef")
    done = run("sources", "check", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stdout
    assert named in done.stdout
    assert "problem(s) in the sources file" in done.stderr
    # `serve` refuses the same file (what the release gate stands for).
    serve = run("handlers", "list", cwd=tmp_path, env=env)
    assert serve.returncode == 2 and serve.stderr.startswith("Error:")


def test_sources_check_names_every_mistake_at_once(tmp_path):
    (tmp_path / "webhooks.toml").write_text(
        'plugin = ["x"]\nplugins = ["tests.plugins.no_such_module"]\n'
        "[outbox.receipt]\nmax_attempt = 3\n\n"
        '[sources.orders]\nscheme = "idempotency-key"\n'
        '[sources.orders.clients]\nacme = "env:ACME_TOKEN_UNSET"\n'
        'globex = "env:GLOBEX_TOKEN_UNSET"\n'
    )
    done = run("sources", "check", cwd=tmp_path, env=_env())
    assert done.returncode == 1
    for named in ("unknown top-level key(s) plugin", "tests.plugins.no_such_module",
                  "max_attempt", "ACME_TOKEN_UNSET", "GLOBEX_TOKEN_UNSET"):
        assert named in done.stdout, named
