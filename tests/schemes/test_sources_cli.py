"""``idemhook sources`` and ``idemhook sources check``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import PROVIDER_SOURCES


def test_sources_lists_url_scheme_locators_and_secret_status(make_app) -> None:
    app = make_app(PROVIDER_SOURCES, IDEMHOOK_PUBLIC_URL="https://hooks.example.com")
    result = app.test_cli_runner().invoke(args=["sources"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "register   https://hooks.example.com/webhooks/hubspot" in out
    hubspot = out.split("hubspot\n", 1)[1].split("\nclose\n", 1)[0]
    assert "scheme     hubspot" in hubspot
    assert "event id   [body:portalId, body:subscriptionId, body:eventId, body:occurredAt]" in (
        hubspot
    )
    assert "event type body:subscriptionType" in hubspot
    assert "batch      a list at the body, at most 100" in hubspot
    assert "secret     resolves" in hubspot
    salesforce = out.split("salesforce\n", 1)[1]
    assert "secret     not needed" in salesforce
    assert PROVIDER_SOURCES["sources"]["stripe"]["secret"] not in out


def test_sources_show_whether_handlers_run_in_the_request_or_in_the_worker(make_app) -> None:
    config = {
        "sources": {
            "crm": {"scheme": "hubspot", "secret": "s" * 32},
            "queued": {
                **{"scheme": "hubspot", "secret": "s" * 32},
                "mode": "async",
                "ack_status": 200,
                "order_key": "body:objectId",
                "max_attempts": 4,
            },
        }
    }
    out = make_app(config).test_cli_runner().invoke(args=["sources"]).output
    crm, queued = out.split("\nqueued\n", 1)
    assert "mode       sync: handlers run in the request" in crm
    assert (
        "mode       async: answered 200, applied by idemhook worker, in order per "
        "body:objectId, at most 4 attempts"
    ) in queued


def test_sources_check_passes_on_a_good_config(make_app) -> None:
    config = {
        **PROVIDER_SOURCES,
        "sources": {
            **PROVIDER_SOURCES["sources"],
            "github": {"scheme": "github", "secret": ["old-secret", "new-secret"]},
        },
    }
    app = make_app(config, IDEMHOOK_PUBLIC_URL="https://hooks.example.com")
    result = app.test_cli_runner().invoke(args=["sources", "check"])
    assert result.exit_code == 0, result.output
    assert "resolves (2 secrets, rotation)" in result.output
    assert result.output.rstrip().endswith("ok: 12 source(s)")


def test_sources_warns_without_public_url(make_app) -> None:
    result = make_app(PROVIDER_SOURCES).test_cli_runner().invoke(args=["sources", "check"])
    assert result.exit_code == 0
    assert "https://<your-host>/webhooks/stripe" in result.output
    assert "warning    no public URL" in result.output


def test_sources_check_fails_naming_the_source_whose_secret_is_unset(tmp_path: Path, pg_url):
    config = tmp_path / "webhooks.toml"
    config.write_text(
        '[sources.billing]\nscheme = "stripe"\nsecret = "env:STRIPE_WEBHOOK_SECRET"\n\n'
        '[sources.crm]\nscheme = "hubspot"\nsecret = "env:HUBSPOT_CLIENT_SECRET"\n',
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "DATABASE_URL": pg_url.render_as_string(hide_password=False),
        "IDEMHOOK_CONFIG": str(config),
        "IDEMHOOK_PUBLIC_URL": "https://hooks.example.com",
        "HUBSPOT_CLIENT_SECRET": "set",
    }
    env.pop("STRIPE_WEBHOOK_SECRET", None)
    entry = "from idemhook._factory import main; main()"
    command = [sys.executable, "-c", entry, "sources", "check"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "PROBLEM    [sources.billing] secret: environment variable STRIPE_WEBHOOK_SECRET" in (
        done.stdout
    )
    assert "1 source(s) with problems: billing" in done.stderr
    billing = done.stdout.split("billing\n", 1)[1].split("\ncrm\n", 1)[0]
    assert "secret     does not resolve" in billing
    assert "event id   body:id" in billing
    crm = done.stdout.split("crm\n", 1)[1]
    assert "PROBLEM" not in crm and "secret     resolves" in crm

    env["STRIPE_WEBHOOK_SECRET"] = "whsec_now_set"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ok: 2 source(s)" in done.stdout
