"""`make run`: the demo serves on a fresh checkout and its printed curl is accepted."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

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

        # The email API's curl, twice: one email reaches the sink, which prints it.
        [email_curl] = [line.strip() for line in output.splitlines() if "/webhooks/emails" in line]
        for expected in ("processed", "duplicate"):
            sent = subprocess.run(["bash", "-c", email_curl], capture_output=True, text=True)
            assert f'"status":"{expected}"' in sent.stdout.replace(" ", ""), sent
        deadline = time.monotonic() + 60
        while "Subject: Hello from idemhook" not in demo.log():
            assert time.monotonic() < deadline, demo.log()
            time.sleep(0.1)  # polling the sink's output, bounded by the deadline
        assert demo.log().count("Subject: Hello from idemhook") == 1
    finally:
        demo.stop()
    assert demo.process.returncode == 143  # stopped by its SIGTERM, not killed
    with pytest.raises(ProcessLookupError):  # the sink, the worker and gunicorn stopped too
        os.killpg(demo.pid, 0)


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
