"""`make run`: the demo serves on a fresh checkout and its printed curl is accepted."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.servers import ROOT, free_port, launch, server_environment

pytestmark = pytest.mark.gunicorn


def test_demo_prints_a_curl_that_gets_processed(tmp_path: Path):
    port = free_port()
    # A fresh checkout's shell: no database or sources of this test run.
    env = {
        k: v
        for k, v in server_environment().items()
        if k not in ("DATABASE_URL", "IDEMHOOK_CONFIG")
    }
    env.update(
        PORT=str(port),
        IDEMHOOK_INSTANCE_DIR=str(tmp_path / "instance"),
        EMAIL_SMTP_PORT=str(free_port()),  # 8025 may be another test run's
    )
    demo = launch(
        ["bash", "scripts/demo.sh"],
        url=f"http://127.0.0.1:{port}",
        env=env,
        log_path=tmp_path / "demo.log",
    )
    try:
        demo.wait_ready()  # the script prints everything before it starts the server
        output = demo.log()
        curls = [line.strip() for line in output.splitlines() if line.startswith("curl ")]
        assert len(curls) == 1, output
        assert "DATABASE_URL is not set: using the SQLite demo database" in output
        assert (tmp_path / "instance" / "idemhook.db").exists()
        answer = subprocess.run(["bash", "-c", curls[0]], capture_output=True, text=True)
        assert '"status":"processed"' in answer.stdout.replace(" ", ""), answer
        again = subprocess.run(["bash", "-c", curls[0]], capture_output=True, text=True)
        assert '"status":"duplicate"' in again.stdout.replace(" ", "")

        # The email API's curl, twice (-i: to see the status line and headers too): the
        # same 202 both times, the second replayed; one email reaches the sink, which
        # prints it.
        [email_curl] = [line.strip() for line in output.splitlines() if "/v1/emails -H" in line]
        answers = []
        for _ in range(2):
            shown = _run(email_curl.replace("curl ", "curl -i ", 1))
            head, _, body = shown.partition("\n\n")  # text mode: CRLF read as LF
            assert head.startswith("HTTP/1.1 202"), shown
            answers.append((head, json.loads(body)))
        (first_head, first), (again_head, again) = answers
        assert first == again and first["status"] == "queued" and isinstance(first["id"], int)
        assert "Idempotent-Replayed" not in first_head
        assert "Idempotent-Replayed: true" in again_head
        deadline = time.monotonic() + 60
        while "Subject: Hello from idemhook" not in demo.log():
            assert time.monotonic() < deadline, demo.log()
            time.sleep(0.1)  # polling the sink's output, bounded by the deadline
        assert demo.log().count("Subject: Hello from idemhook") == 1
        # The status curl, with the answer's id: sent, with the sink's answer.
        [status_curl] = [line.strip() for line in output.splitlines() if "/v1/emails/ID" in line]
        status = json.loads(_run(status_curl.replace("/v1/emails/ID", f"/v1/emails/{first['id']}")))
        assert status["status"] == "sent" and status["sent_at"], status
        assert status["smtp"].startswith("250 "), status
        _log_in_to_the_printed_dashboard(output)
    finally:
        demo.stop()
    assert demo.process.returncode == 143  # stopped by its SIGTERM, not killed
    with pytest.raises(ProcessLookupError):  # the sink, the worker and gunicorn stopped too
        os.killpg(demo.pid, 0)


def _run(command: str) -> str:
    """Run a printed command line as a user pastes it; its output."""
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    return done.stdout


def _log_in_to_the_printed_dashboard(output: str) -> None:
    """The dashboard line names a URL and a token that open it (on the demo's SQLite)."""
    found = re.search(r"The dashboard: (\S+) \(log in with the demo's admin token: (\S+);", output)
    assert found, output
    url, token = found.groups()
    browser = requests.Session()
    browser.headers["Accept"] = "text/html"
    form = browser.get(url, timeout=10)
    assert form.url.startswith(f"{url}/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    browser.post(f"{url}/login", data={"csrf_token": csrf, "token": token}, timeout=10)
    events = browser.get(f"{url}/events", timeout=10)
    assert events.status_code == 200
    assert "evt_demo_" in events.text  # the curl's event, delivered above
    assert browser.get(url, timeout=10).status_code == 200  # the overview, on SQLite


def test_demo_on_a_taken_port_says_so_before_printing_anything(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IDEMHOOK_CONFIG")}
        env.update(PORT=str(port), IDEMHOOK_INSTANCE_DIR=str(tmp_path / "instance"))
        done = subprocess.run(
            ["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""  # no "Serving on", no curl, no database message
    assert done.stderr.splitlines() == [
        f"Port {port} is in use (or is not a port number): stop what listens on it, or choose "
        "another port with PORT=, e.g. PORT=8001 make run"
    ]
    assert not (tmp_path / "instance").exists()


def test_make_run_checks_its_ports_before_installing_anything(tmp_path: Path):
    # A fresh clone: no virtualenv yet. A taken port is said before any install starts.
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            ["make", "--no-print-directory", "run"], cwd=tmp_path,
            env={**os.environ, "PORT": str(port)}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode != 0
    assert f"Port {port} is in use" in done.stderr
    assert not (tmp_path / ".venv").exists()  # nothing was installed
