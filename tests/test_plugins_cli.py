"""`idemhook send` against a real HTTP server, and `idemhook sign` sharing its signing."""

from __future__ import annotations

import json
import threading

import pytest
from werkzeug.serving import make_server

from idemhook import create_app
from tests.servers import gunicorn
from tests.test_plugins import LEDGER


@pytest.fixture
def serve():
    """Serve an app over real HTTP on a free port; return its base URL."""
    servers = []

    def start(app):
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


def test_send_signs_posts_and_prints_the_answer(idemhook, serve, tmp_path):
    kit = idemhook(LEDGER)
    url = serve(kit.app)
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"id": "s1", "type": "order.paid"}))

    result = kit.runner.invoke(args=["send", "shop", str(event), "--url", url])
    assert result.exit_code == 0, result.output
    status, answer = result.output.split("\n", 1)
    assert status == "HTTP 200"
    assert json.loads(answer)["status"] == "processed"
    kit.assert_processed("shop", "s1")

    again = kit.runner.invoke(args=["send", "shop", str(event), "--url", url])
    assert json.loads(again.output.split("\n", 1)[1])["status"] == "duplicate"


def test_send_reports_a_refusal_and_exits_1(idemhook, serve, tmp_path):
    kit = idemhook(LEDGER)
    url = serve(kit.app)
    wrong = {**LEDGER["sources"]["shop"], "secret": "not-the-receivers-secret"}
    sender = create_app(
        {
            "DATABASE_URL": "sqlite://",
            "IDEMHOOK_CONFIG": {"plugins": [], "sources": {"shop": wrong}},
        }
    )
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"id": "s2", "type": "order.paid"}))
    result = sender.test_cli_runner().invoke(args=["send", "shop", str(event), "--url", url])
    assert result.exit_code == 1
    assert result.output.startswith("HTTP 401\n")
    assert json.loads(result.output.split("\n", 1)[1])["error"] == "invalid_signature"
    kit.assert_not_recorded("shop", "s2")


def test_send_with_extra_header_for_header_located_ids(idemhook, serve, tmp_path):
    other = {"scheme": "none", "allow_unverified": True, "event_id": "header:X-Event-Id"}
    kit = idemhook({**LEDGER, "sources": {**LEDGER["sources"], "other": other}})
    url = serve(kit.app)
    event = tmp_path / "event.json"
    event.write_text('{"note": "no id in the body"}')
    result = kit.runner.invoke(
        args=["send", "other", str(event), "--url", url, "-H", "X-Event-Id: h1"]
    )
    assert result.exit_code == 0, result.output
    kit.assert_processed("other", "h1")


def test_send_to_nothing_listening_fails_clearly(tmp_path):
    app = create_app(
        {"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": {"sources": LEDGER["sources"]}}
    )
    event = tmp_path / "event.json"
    event.write_text("{}")
    result = app.test_cli_runner().invoke(
        args=["send", "shop", str(event), "--url", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 1
    assert "could not reach http://127.0.0.1:9/webhooks/shop" in result.output


def test_send_and_sign_refuse_an_unknown_source(tmp_path):
    app = create_app(
        {"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": {"sources": LEDGER["sources"]}}
    )
    event = tmp_path / "event.json"
    event.write_text("{}")
    for command in ("send", "sign"):
        result = app.test_cli_runner().invoke(args=[command, "shpo", str(event)])
        assert result.exit_code == 2
        assert "no source named 'shpo'; configured: other, shop, shop-batch" in result.output


@pytest.mark.gunicorn
def test_concurrent_deliveries_of_a_rejected_event_reject_it_once(idemhook):
    import requests

    from idemhook.testing import signed

    kit = idemhook(LEDGER)
    with gunicorn(LEDGER, kit.url) as server:
        event = {"id": "race", "type": "order.paid", "second": "reject", "sleep": 0.1}
        target, body, headers = signed(kit.app, "shop", event, base_url=server.url)
        barrier = threading.Barrier(6)
        answers = []

        def post():
            barrier.wait()
            answers.append(requests.post(target, data=body, headers=headers, timeout=30))

        threads = [threading.Thread(target=post) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [a.status_code for a in answers] == [200] * 6
    assert sorted(a.json()["status"] for a in answers) == ["duplicate"] * 5 + ["rejected"]
    kit.assert_rejected("shop", "race", reason="unknown currency", duplicates=5)
    assert kit.sql("SELECT count(*) FROM ledger") == [(0,)]
