"""`make run`: the demo serves on a fresh checkout and its printed curl is accepted."""

from __future__ import annotations

import os
import signal
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
