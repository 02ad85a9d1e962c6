"""`make run`: the demo serves on a fresh checkout and its printed curl is accepted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.servers import ROOT, free_port

pytestmark = pytest.mark.gunicorn


def test_demo_prints_a_curl_that_gets_processed(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IDEMHOOK_CONFIG")}
    env.update(PORT=str(port), IDEMHOOK_INSTANCE_DIR=str(tmp_path / "instance"))
    demo = subprocess.Popen(
        ["bash", "scripts/demo.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        curl = None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("curl "):
                curl = line.strip()
            if "Booting worker" in line or "Listening at" in line:
                if curl:
                    break
        assert curl, "".join(lines)
        output = "".join(lines)
        assert "DATABASE_URL is not set: using the SQLite demo database" in output
        assert (tmp_path / "instance" / "idemhook.db").exists()
        for _ in range(100):  # the workers may still be importing
            answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True)
            if answer.returncode == 0 and answer.stdout:
                break
            time.sleep(0.1)
        assert '"status":"processed"' in answer.stdout.replace(" ", ""), answer
        again = subprocess.run(["bash", "-c", curl], capture_output=True, text=True)
        assert '"status":"duplicate"' in again.stdout.replace(" ", "")
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(timeout=30)
        demo.stdout.close()


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
