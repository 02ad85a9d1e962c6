"""No forgeable configuration: every scheme refuses a secret that anyone could sign with.

An empty or whitespace-only secret, a provider's prefix alone (``whsec_``) or a
secret that decodes to zero bytes would make the HMAC key known to everybody.
Each is refused at start-up and by ``idemhook sources check``, naming the
source; short secrets draw a warning.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks

from idemhook import create_app
from idemhook._config.schemes import SCHEMES
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from tests.servers import toml

from .conftest import PROVIDER_SOURCES

#: A valid table per scheme name, taken from the receiver the provider tests use.
TABLES = {table["scheme"]: table for table in PROVIDER_SOURCES["sources"].values()}
WITH_SECRET = sorted(name for name, cls in SCHEMES.items() if cls.needs_secret)
PREFIXED = sorted(name for name in WITH_SECRET if SCHEMES[name].secret_prefix)
BLANK = ["", " ", "\t \n"]


def test_every_scheme_with_a_secret_is_covered() -> None:
    # A scheme added later is picked up here without touching this file.
    assert set(WITH_SECRET) <= set(TABLES), set(WITH_SECRET) - set(TABLES)
    assert PREFIXED == ["shopify", "standard-webhooks", "stripe", "svix"]


def start(db_url: Any, table: dict[str, Any]) -> None:
    create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": {"sources": {"src": table}}})


@pytest.mark.parametrize("scheme", WITH_SECRET)
@pytest.mark.parametrize("secret", BLANK, ids=["empty", "space", "whitespace"])
def test_blank_secret_stops_start_up(scheme: str, secret: str, pg_url) -> None:
    with pytest.raises(ConfigError, match=r"\[sources\.src\] secret: must be a non-empty"):
        start(pg_url, {**TABLES[scheme], "secret": secret})


@pytest.mark.parametrize("scheme", WITH_SECRET)
def test_blank_secret_in_a_rotation_list_stops_start_up(scheme: str, pg_url) -> None:
    good = TABLES[scheme]["secret"]
    with pytest.raises(ConfigError, match=r"\[sources\.src\] secret\[2\]: must be a non-empty"):
        start(pg_url, {**TABLES[scheme], "secret": [good, "  "]})


@pytest.mark.parametrize("scheme", WITH_SECRET)
def test_whitespace_from_the_environment_stops_start_up(scheme: str, pg_url, monkeypatch) -> None:
    monkeypatch.setenv("BLANK_SECRET", "   ")
    with pytest.raises(
        ConfigError,
        match=r"\[sources\.src\] secret \(env:BLANK_SECRET\): environment variable BLANK_SECRET "
        "holds only whitespace",
    ):
        start(pg_url, {**TABLES[scheme], "secret": "env:BLANK_SECRET"})


@pytest.mark.parametrize("scheme", PREFIXED)
@pytest.mark.parametrize("suffix", ["", "  "], ids=["bare", "spaces"])
def test_prefix_only_secret_stops_start_up(scheme: str, suffix: str, pg_url) -> None:
    prefix = SCHEMES[scheme].secret_prefix
    expected = rf"\[sources\.src\] secret: is only the prefix '{prefix}'"
    with pytest.raises(ConfigError, match=expected):
        start(pg_url, {**TABLES[scheme], "secret": prefix + suffix})


def test_pipedrive_blank_username_is_refused(pg_url) -> None:
    with pytest.raises(ConfigError, match=r"\[sources\.src\] username: required"):
        start(pg_url, {**TABLES["pipedrive"], "username": "   "})


def test_no_scheme_keeps_an_empty_key() -> None:
    # Whatever a scheme derives its key from, the key it signs and verifies with has bytes.
    for name in WITH_SECRET:
        scheme = SCHEMES[name]("src", TABLES[name])
        assert scheme.keys and all(len(key) > 0 for key in scheme.keys), name


def test_sources_check_names_every_forgeable_source(tmp_path: Path, pg_url) -> None:
    sources: dict[str, Any] = {}
    for scheme in WITH_SECRET:
        sources[f"{scheme}-empty"] = {**TABLES[scheme], "secret": ""}
        sources[f"{scheme}-blank"] = {**TABLES[scheme], "secret": "  "}
    for scheme in PREFIXED:
        sources[f"{scheme}-prefix"] = {**TABLES[scheme], "secret": SCHEMES[scheme].secret_prefix}
    sources["fine"] = {"scheme": "github", "secret": "a-long-enough-random-secret"}
    config = tmp_path / "webhooks.toml"
    config.write_text(toml({"sources": sources}), encoding="utf-8")
    done = _sources_check(config, pg_url)
    assert done.returncode == 1, done.stdout + done.stderr
    broken = [name for name in sources if name != "fine"]
    assert f"{len(broken)} source(s) with problems: {', '.join(broken)}" in done.stderr
    reports = blocks(done.stdout)
    for name in broken:
        assert f"PROBLEM    [sources.{name}] secret" in reports[name], reports[name]
        assert "secret     refused" in reports[name]
    assert "PROBLEM" not in reports["fine"]


def test_sources_check_warns_about_short_secrets(tmp_path: Path, pg_url) -> None:
    eight_bytes = "whsec_" + base64.b64encode(b"12345678").decode()  # 18 characters, 8 bytes
    sixteen = "whsec_" + base64.b64encode(b"0123456789abcdef").decode()
    config = tmp_path / "webhooks.toml"
    config.write_text(
        toml(
            {
                "sources": {
                    "short": {"scheme": "github", "secret": "eleven-char"},
                    "decoded": {"scheme": "standard-webhooks", "secret": eight_bytes},
                    "rotating": {"scheme": "github", "secret": ["x" * 16, "short"]},
                    "long": {"scheme": "standard-webhooks", "secret": sixteen},
                }
            }
        ),
        encoding="utf-8",
    )
    done = _sources_check(config, pg_url)
    assert done.returncode == 0, done.stdout + done.stderr  # a warning, not a failure
    reports = blocks(done.stdout)
    assert "warning    secret is only 11 bytes" in reports["short"]
    assert "warning    secret is only 8 bytes" in reports["decoded"]
    assert "warning    secret[2] is only 5 bytes" in reports["rotating"]
    assert "secret[1]" not in reports["rotating"]
    assert "bytes" not in reports["long"]


def test_unpadded_standard_webhooks_secret_verifies_like_the_reference_library(make_app) -> None:
    raw = base64.b64encode(b"an-unpadded-key-of-29-bytes!!").decode()
    assert raw.endswith("=")
    secret = "whsec_" + raw.rstrip("=")
    app = make_app({"sources": {"sw": {"scheme": "standard-webhooks", "secret": secret}}})
    body = json.dumps({"type": "ping", "n": 1})
    now = datetime.now(UTC)
    timestamp = str(int(now.timestamp()))
    signature = standardwebhooks.Webhook(secret).sign("msg_1", now, body)
    answer = app.test_client().post(
        "/webhooks/sw",
        data=body,
        headers={
            "Content-Type": "application/json",
            "webhook-id": "msg_1",
            "webhook-timestamp": timestamp,
            "webhook-signature": signature,
        },
    )
    assert answer.status_code == 200, answer.json
    assert deliver(app.test_client(), "sw", {"type": "ping", "n": 2}).status_code == 200


def blocks(output: str) -> dict[str, str]:
    """``idemhook sources`` output split into one text per source (its indented lines)."""
    reports: dict[str, str] = {}
    name = ""
    for line in output.splitlines():
        if line and not line.startswith(" "):
            name = line
            reports[name] = ""
        elif name:
            reports[name] += line + "\n"
    return reports


def _sources_check(config: Path, pg_url) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DATABASE_URL": pg_url.render_as_string(hide_password=False),
        "IDEMHOOK_CONFIG": str(config),
        "IDEMHOOK_PUBLIC_URL": "https://hooks.example.com",
    }
    command = [str(Path(sys.executable).with_name("idemhook")), "sources", "check"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
