"""With IDEMHOOK_PUBLIC_URL set, the signing helpers sign the URL the receiver checks.

HubSpot signs the URL it called; behind a proxy the receiver checks the public URL,
not the address a request reached. The test kit, ``idemhook sign`` and ``idemhook
send`` must sign that same URL, or testing HubSpot with production settings fails.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from idemhook.testing import postgres
from tests.servers import ROOT, gunicorn

PUBLIC = "https://hooks.example.com/prefix"
IDEMHOOK = str(Path(sys.executable).with_name("idemhook"))
EXAMPLE = {
    "plugins": ["examples.crm.handlers"],
    "sources": {"hubspot": {"scheme": "hubspot", "secret": "env:HUBSPOT_CLIENT_SECRET"}},
}
SECRETS = {"HUBSPOT_CLIENT_SECRET": "hubspot-client-secret-for-tests"}


def test_the_hubspot_examples_tests_pass_with_a_public_url(pg_server: URL) -> None:
    env = {
        **os.environ,
        "IDEMHOOK_PUBLIC_URL": PUBLIC,
        "TEST_DATABASE_URL": pg_server.render_as_string(hide_password=False),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/examples"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.fixture
def crm_database(pg_server: URL, tmp_path: Path) -> Iterator[tuple[URL, Path]]:
    """A database migrated for the CRM example, and its sources file."""
    url = postgres.create_database(pg_server, prefix="idemhook_public_url")
    config = tmp_path / "webhooks.toml"
    config.write_text(
        'plugins = ["examples.crm.handlers"]\n\n'
        '[sources.hubspot]\nscheme = "hubspot"\nsecret = "env:HUBSPOT_CLIENT_SECRET"\n'
    )
    env = {**os.environ, **SECRETS, "DATABASE_URL": _text(url), "IDEMHOOK_CONFIG": str(config)}
    upgrade = subprocess.run(
        [IDEMHOOK, "db", "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert upgrade.returncode == 0, upgrade.stderr
    yield url, config
    postgres.drop_database(url)


@pytest.mark.gunicorn
def test_send_and_sign_are_accepted_by_a_receiver_with_the_same_public_url(crm_database):
    url, config = crm_database
    settings = {**SECRETS, "IDEMHOOK_PUBLIC_URL": PUBLIC}
    env = {**os.environ, **settings, "DATABASE_URL": _text(url), "IDEMHOOK_CONFIG": str(config)}
    with gunicorn(EXAMPLE, url, workers=1, env=settings) as server:
        sent = subprocess.run(
            [IDEMHOOK, "send", "hubspot", "examples/crm/events/contact_creation.json",
             "--url", server.url],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.stdout.startswith("HTTP 200\n"), sent.stdout + sent.stderr
        assert sent.stdout.count('"status":"processed"') == 2

        curl = subprocess.run(
            [IDEMHOOK, "sign", "hubspot", "examples/crm/events/contact_creation.json",
             "--url", server.url],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert curl.returncode == 0, curl.stderr
        assert shlex.split(curl.stdout)[4] == f"{server.url}/webhooks/hubspot"  # posted locally
        answer = subprocess.run(
            ["bash", "-c", curl.stdout], capture_output=True, text=True, timeout=60
        )
        assert answer.stdout.count('"status":"duplicate"') == 2, answer.stdout

        # A sender without the setting signs the address it posts to, which is not the URL
        # this receiver checks: refused, so the match above is the setting's doing.
        bare = {k: v for k, v in env.items() if k != "IDEMHOOK_PUBLIC_URL"}
        other = subprocess.run(
            [IDEMHOOK, "send", "hubspot", "examples/crm/events/contact_creation.json",
             "--url", server.url],
            cwd=ROOT, env=bare, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.stdout.startswith("HTTP 401\n") and "invalid_signature" in other.stdout
        # The answer names the URL that was verified, and the refusal is on record.
        assert f"the URL verified was {PUBLIC}/webhooks/hubspot" in other.stdout
        engine = create_engine(url)
        with engine.connect() as conn:
            refused = conn.execute(
                text("SELECT source, error, status_code FROM rejected_deliveries")
            ).all()
        engine.dispose()
        assert refused == [("hubspot", "invalid_signature", 401)]


def _text(url: URL) -> str:
    return url.render_as_string(hide_password=False)
