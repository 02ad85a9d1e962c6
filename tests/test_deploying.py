"""docs/deploying.md, for real: examples/my-webhooks as a repository of its own.

idemhook is built into a wheel, which holds one top-level package, ``idemhook``. The
skeleton, with its plugin package renamed ``app`` (the most common Flask layout, and
idemhook's own repository's folder name), and the wheel are installed into a fresh
virtualenv; then, from the project's own directory with only its own settings: its
tests pass, ``idemhook db upgrade`` migrates (its own branch too), ``idemhook serve``
serves with the shipped worker class, and a signed delivery is processed into the
project's table.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from idemhook.testing import postgres
from tests.servers import ROOT, free_port, launch

pytestmark = pytest.mark.gunicorn

SKELETON = ROOT / "examples" / "my-webhooks"
#: What a copy of the repository leaves out: local state, never part of a release.
NOT_SHIPPED = shutil.ignore_patterns(
    ".git", ".venv", "instance", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis",
)  # fmt: skip


@pytest.fixture
def database(pg_server: URL) -> Iterator[URL]:
    url = postgres.create_database(pg_server, prefix="idemhook_deploy")
    yield url
    postgres.drop_database(url)


def sh(*args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 300):
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (args, done.stdout[-4000:], done.stderr[-4000:])
    return done


def test_a_separate_project_installs_migrates_serves_and_answers(
    tmp_path: Path, pg_server: URL, database: URL
) -> None:
    # A release of idemhook (a copy: building in the clone would leave build/ behind) and the
    # project, side by side; nothing of this clone is on the path.
    release = tmp_path / "idemhook-release"
    shutil.copytree(ROOT, release, ignore=NOT_SHIPPED)
    project = tmp_path / "my-webhooks"
    shutil.copytree(SKELETON, project, ignore=NOT_SHIPPED)
    # The user's own package is `app`, as in most Flask projects.
    (project / "my_webhooks").rename(project / "app")
    toml = project / "pyproject.toml"
    toml.write_text(toml.read_text().replace('"my_webhooks', '"app'))
    venv = tmp_path / "venv"
    bin_ = venv / "bin"
    base = {k: v for k, v in os.environ.items() if k.startswith(("PIP_", "LANG", "LC_"))}
    env = {**base, "PATH": f"{bin_}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path)}

    sh(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
    built = sh(bin_ / "python", "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist",
               release, cwd=tmp_path, env=env)  # fmt: skip
    assert "deprecated" not in (built.stdout + built.stderr).lower()
    [wheel] = (tmp_path / "dist").glob("idemhook-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"idemhook"}
    sh(bin_ / "python", "-m", "pip", "install", wheel, cwd=tmp_path, env=env)
    sh(bin_ / "python", "-m", "pip", "install", f"{project}[test]", cwd=tmp_path, env=env)
    # Installed, not linked: both run from the virtualenv, and `app` is the user's.
    where = sh(bin_ / "python", "-c",
               "import app, idemhook; print(app.__file__); print(idemhook.__file__)",
               cwd=tmp_path, env=env)  # fmt: skip
    user_app, ours = where.stdout.splitlines()
    assert user_app.startswith(str(venv)) and user_app.endswith("app/__init__.py")
    assert ours.startswith(str(venv)) and ours.endswith("idemhook/__init__.py")

    secret = {"SHOP_WEBHOOK_SECRET": "a-production-secret-of-some-length"}
    tests = sh(
        bin_ / "pytest", "-q", "-p", "no:cacheprovider", cwd=project,
        env={**env, "TEST_DATABASE_URL": pg_server.render_as_string(hide_password=False)},
    )  # fmt: skip
    assert "2 passed" in tests.stdout

    port = free_port()
    run_env = {
        **env,
        **secret,
        "DATABASE_URL": database.render_as_string(hide_password=False),
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
    }
    checked = sh(bin_ / "idemhook", "db", "upgrade", cwd=project, env=run_env)
    assert "my_webhooks_0001" in checked.stdout
    sh(bin_ / "idemhook", "sources", "check", cwd=project, env=run_env)

    server = launch(
        [str(bin_ / "idemhook"), "serve"],
        url=f"http://127.0.0.1:{port}",
        env=run_env,
        log_path=tmp_path / "serve.log",
        cwd=project,
    )
    try:
        server.wait_ready()
        assert "Using worker: gthread" in server.log()
        sent = sh(bin_ / "idemhook", "send", "shop", "events/order_paid.json", "--url", server.url,
                  cwd=project, env=run_env, timeout=60)  # fmt: skip
        assert sent.stdout.splitlines() == [
            "HTTP 200",
            '{"event_id":"evt_1001","result":{"order":7},"status":"processed"}',
        ]
    finally:
        server.stop()
    engine = create_engine(database)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT order_id, total_cents FROM paid_orders")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [(7, 2500)]
