"""docs/plugins.md's tutorial, followed to the letter: its code blocks are what runs here.

Blocks tagged ``file=PATH`` are written into an empty project folder (beside a
link to this clone's .venv, as on a fresh clone after ``make install``); ``sh``
blocks run in order in one shell; the ``sh server`` block runs in the background
until the end; a ``text output`` block must equal the output of the block before it.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)


def blocks(section: str) -> list[tuple[str, str, str]]:
    """``(language, info, body)`` of each fenced block in the section ``## <section>``."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return [
        (m[1], m[2].strip(), m[3]) for m in FENCE.finditer(text[start : end if end > 0 else None])
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tutorial_blocks_are_all_accounted_for():
    kinds = [(lang, info.split()[0] if info else "") for lang, info, _ in blocks("Tutorial")]
    assert kinds == [
        ("python", "file=shop_orders/__init__.py"),
        ("python", "file=shop_orders/migrations/shop_0001_paid_orders.py"),
        ("toml", "file=webhooks.toml"),
        ("python", "file=test_shop_orders.py"),
        ("sh", ""),
        ("sh", ""),
        ("sh", ""),
        ("text", "output"),
        ("sh", "server"),
        ("json", "file=order.json"),
        ("sh", ""),
        ("text", "output"),
    ]


@pytest.mark.gunicorn
def test_following_the_tutorial_gives_a_tested_running_handler(tmp_path, pg_server):
    project = tmp_path / "clone"
    project.mkdir()
    (project / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()

    script = ["set -euo pipefail"]
    expected: dict[int, str] = {}
    for index, (lang, info, body) in enumerate(blocks("Tutorial")):
        if info.startswith("file="):
            path = project / info.removeprefix("file=")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
        elif lang == "sh" and info == "server":
            script.append(f"{body.strip().replace('8000', str(port))} > server.log 2>&1 &")
            script.append("server=$!; trap 'kill $server' EXIT")
            script.append(
                f"for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null "
                "&& break; sleep 0.1; done"
            )
        elif lang == "sh":
            script.append(f"{{\n{body.replace('8000', str(port))}}} > out_{index}.txt")
        elif lang == "text" and info == "output":
            expected[index - 1] = body

    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        # The tutorial's pytest run uses this test run's PostgreSQL, not a second cluster.
        "TEST_DATABASE_URL": pg_server.render_as_string(hide_password=False),
    }
    run = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    outputs = {p.name: p.read_text() for p in project.glob("out_*.txt")}
    assert run.returncode == 0, (run.stdout, run.stderr, outputs)
    assert "2 passed" in outputs["out_4.txt"]  # the tutorial's own test
    for index, text in expected.items():
        assert outputs[f"out_{index}.txt"] == text, f"block {index}: {shlex.quote(text)}"
    assert (project / "instance" / "shop.db").exists()
