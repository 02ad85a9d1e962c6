"""``idemhook reconcile`` in-process, on real PostgreSQL, against the local provider fakes:
the start-up checks, usage errors, a plugin's ``@reconciler``, failures, the fence, the
history, the read API and the dashboard. The live-delivery races with gunicorn and real
workers are in ``tests/reliability/test_reconcile.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine

from idemhook import create_app, reconciler
from idemhook._config.sources import load as load_sources
from idemhook._engine.reconcile import configured
from idemhook._engine.reconcile.http import MAX_TRIES, verdict
from idemhook._engine.registry import Reconciler, Registry, collect_reconcilers
from idemhook._store import reconcile_runs
from idemhook._store.reconcile_runs import Counts
from idemhook._values.errors import ConfigError
from idemhook.testing import deliver
from tests.dashboard.conftest import TOKEN, Browser
from tests.fake_providers import GITHUB_TOKEN, HOOK, STRIPE_KEY, FakeProvider
from tests.plugins.reconciled import CRM_DATABASE_VARIABLE
from tests.reliability.test_reconcile import report_of, sources, stripe_event
from tests.test_openapi_routes import conforms

ENTRY = "from idemhook._factory import main; main()"


def _app(config: dict, **settings):
    return create_app({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                       "IDEMHOOK_CONFIG": config, **settings})


def _stripe(reconcile: dict, **source) -> dict:
    return {
        "sources": {
            "stripe": {"scheme": "stripe", "secret": "whsec_x", "reconcile": reconcile, **source}
        }
    }


# -- start-up checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "settings", "message"),
    [
        (
            _stripe({"api_key": "sk_test_1", "lookbak": "3d"}),
            {},
            r"\[sources.stripe.reconcile\]: unknown key\(s\) lookbak for a stripe source "
            r"\(known: api_key, api_base, lookback, every\)",
        ),
        (
            _stripe({"lookback": "3d"}),
            {},
            r"\[sources.stripe.reconcile\] api_key: missing; give a literal or env:NAME",
        ),
        (
            _stripe({"api_key": "env:IDEMHOOK_TEST_UNSET_STRIPE_KEY"}),
            {},
            r"\[sources.stripe\] reconcile.api_key: environment variable "
            r"IDEMHOOK_TEST_UNSET_STRIPE_KEY is not set",
        ),
        (
            _stripe({"api_key": "sk_test_1", "lookback": "3d"}),
            {"IDEMHOOK_RETENTION": "2d"},
            r"\[sources.stripe.reconcile\] lookback: 3d is not shorter than "
            r"IDEMHOOK_RETENTION \(2d\)",
        ),
        (
            _stripe({"api_key": "sk_test_1", "lookback": "31d"}),
            {},
            r"\[sources.stripe.reconcile\] lookback: Stripe lists events of the last 30 days",
        ),
        (
            _stripe({"api_key": "sk_test_1", "every": "soon"}),
            {},
            r"\[sources.stripe.reconcile\] every: a duration like '15m', '6h' or '3d'",
        ),
        (
            {"sources": {"gh": {"scheme": "github", "secret": "s", "reconcile": {"hook": HOOK}}}},
            {},
            r"\[sources.gh.reconcile\] token: missing",
        ),
        (
            {
                "sources": {
                    "gh": {
                        "scheme": "github",
                        "secret": "s",
                        "reconcile": {"token": "t", "hook": "acme/shop/4242"},
                    }
                }
            },
            {},
            r"\[sources.gh.reconcile\] hook: 'repos/OWNER/REPO/hooks/HOOK_ID'",
        ),
        (
            {
                "sources": {
                    "acme": {
                        "scheme": "hmac-sha256",
                        "secret": "s",
                        "event_id": "body:id",
                        "reconcile": {"every": "1h"},
                    }
                }
            },
            {},
            r"\[sources.acme.reconcile\]: scheme 'hmac-sha256' has no built-in reconciler "
            r".*no plugin registers @reconciler\('acme'\)",
        ),
        (
            _stripe({"api_key": "sk_test_1"}),
            {"IDEMHOOK_RETENTION": "a month"},
            r"IDEMHOOK_RETENTION: a duration like",
        ),
        (
            _stripe({"api_key": "sk_test_1", "api_base": "http://api.stripe.com"}),
            {},
            r"\[sources.stripe.reconcile\] api_base: https:// \(the key or token is sent with "
            r"every request\)",
        ),
    ],
    ids=[
        "unknown-key",
        "missing-key",
        "unset-env",
        "lookback-vs-retention",
        "stripe-30-days",
        "bad-every",
        "missing-token",
        "bad-hook",
        "no-reconciler",
        "bad-retention",
        "plain-http",
    ],
)
def test_the_start_up_check_refuses_a_bad_reconcile_table_naming_the_source(
    config, settings, message
):
    with pytest.raises(ConfigError, match=message):
        _app(config, **settings)


def test_a_lookback_shorter_than_retention_and_env_keys_start(monkeypatch):
    monkeypatch.setenv("IDEMHOOK_TEST_STRIPE_KEY", "sk_test_from_env")
    app = _app(
        _stripe({"api_key": "env:IDEMHOOK_TEST_STRIPE_KEY", "lookback": "3d", "every": "15m"}),
        IDEMHOOK_RETENTION="30d",
    )
    config = app.extensions["idemhook.reconcile"]["stripe"]
    assert (config.lookback, config.every) == (timedelta(days=3), timedelta(minutes=15))
    assert config.credential == "sk_test_from_env"
    assert "sk_test_from_env" not in repr(config)


def test_a_plugin_reconciler_for_an_unknown_source_or_a_built_in_one_is_refused():
    @reconciler("crm")
    @reconciler("stripe")
    def search(window):
        return []

    registry = Registry()
    for found in collect_reconcilers(search):
        registry.add_reconciler(found, "plugin 'mine'")
    with pytest.raises(ConfigError, match=r"reconciler .*search is registered for source 'crm', "
                       r"which is not in the sources file \(configured: stripe\)"):
        registry.check_sources(["stripe"])
    loaded = load_sources(_stripe({"api_key": "sk_test_1"}), max_body_bytes=1024)
    with pytest.raises(ConfigError, match=r"reconciler .*search is registered for source "
                       r"'stripe', whose scheme 'stripe' has a built-in reconciler"):
        configured(loaded.sources, registry, None)
    with pytest.raises(ConfigError, match=r"plugin 'mine': reconciler .* is registered for "
                       r"source 'crm', which .* already reconciles: one per source"):
        registry.add_reconciler(Reconciler("crm", lambda window: []), "plugin 'mine'")


def test_sources_check_names_the_reconcile_problems(tmp_path, pg_url):
    config = tmp_path / "webhooks.toml"
    config.write_text(
        '[sources.billing]\nscheme = "stripe"\nsecret = "whsec_x"\n'
        '[sources.billing.reconcile]\napi_key = "sk_test_1"\nlookback = "40d"\n\n'
        '[sources.shop]\nscheme = "stripe"\nsecret = "whsec_y"\n'
        '[sources.shop.reconcile]\napi_key = "sk_test_2"\nlookback = "7d"\n\n'
        '[sources.code]\nscheme = "github"\nsecret = "s"\n'
        '[sources.code.reconcile]\ntoken = "env:IDEMHOOK_TEST_GITHUB_TOKEN"\n'
        'hook = "orgs/acme/hooks/7"\nevery = "15m"\nlookback = "2d"\n',
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "DATABASE_URL": pg_url.render_as_string(hide_password=False),
        "IDEMHOOK_CONFIG": str(config),
        "IDEMHOOK_PUBLIC_URL": "https://hooks.example.com",
        "IDEMHOOK_RETENTION": "5d",
        "IDEMHOOK_TEST_GITHUB_TOKEN": "ghp_set",
    }
    command = [sys.executable, "-c", ENTRY, "sources", "check"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    billing, rest = done.stdout.split("billing\n", 1)[1].split("\nshop\n", 1)
    assert "PROBLEM    [sources.billing.reconcile] lookback: Stripe lists events of the last " in (
        billing
    )
    shop, code = rest.split("\ncode\n", 1)
    assert "PROBLEM    [sources.shop.reconcile] lookback: 7d is not shorter than " in shop
    assert "reconcile  GitHub's deliveries of orgs/acme/hooks/7, lookback 2d, every 15m" in code
    assert "PROBLEM" not in code
    assert "2 source(s) with problems: billing, shop" in done.stderr
    assert "ghp_set" not in done.stdout + done.stderr


# -- what the providers' answers mean --------------------------------------------------------


def test_the_providers_limits_and_refusals_follow_their_documentation():
    now = 1_000_000.0
    # 429 with Retry-After: wait that long.
    assert verdict("stripe", 429, {"retry-after": "3"}, "", 1, now).seconds == 3
    # Stripe's 429 without it: an exponential backoff, unless Stripe says not to retry.
    assert verdict("stripe", 429, {}, "", 1, now).action == "wait"
    assert verdict("stripe", 429, {"stripe-should-retry": "false"}, "", 1, now).action == (
        "failed"
    )
    # GitHub's primary rate limit: 403 or 429 with x-ratelimit-remaining 0, until the reset.
    limited = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(now) + 20)}
    assert verdict("github", 403, limited, "API rate limit exceeded", 1, now).seconds == 20
    # A secondary limit without retry-after: at least a minute.
    found = verdict("github", 403, {}, "You have exceeded a secondary rate limit", 1, now)
    assert (found.action, found.seconds) == ("wait", 60)
    # Any other 403, and 401: the token (or key) was refused.
    assert verdict("github", 403, {}, "Must have admin rights", 1, now).message == (
        "the token was refused (HTTP 403: it lacks the permission to read this)"
    )
    assert verdict("stripe", 401, {}, "Invalid API Key provided: sk_test_****", 1, now) == (
        verdict("stripe", 401, {}, "", 1, now)
    )
    # 5xx: retried with backoff within the run, then the run fails.
    assert verdict("github", 502, {}, "", 1, now).action == "wait"
    assert verdict("stripe", 500, {}, "", MAX_TRIES, now).message.startswith("HTTP 500, 5 times")
    assert verdict("github", 404, {}, "Not Found", 1, now).message == "HTTP 404 (Not Found)"


# -- the command -------------------------------------------------------------------------------


@pytest.fixture
def provider():
    """The provider fakes with three Stripe events of the last hour."""
    events = [stripe_event(i, time.time() - 3600 + 60 * i) for i in range(3)]
    with FakeProvider(stripe_events=events) as fake:
        yield fake


def test_usage_errors_exit_2_with_one_line(make_app, provider):
    runner = make_app(sources(provider.url)).test_cli_runner()
    for args, message in (
        (["reconcile", "nosuch"], "no source named 'nosuch'; configured: crm, github, stripe"),
        (["reconcile", "stripe", "--since", "yesterday"], "--since: 'yesterday' is not a duration"),
    ):
        result = runner.invoke(args=args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1
    config = sources(provider.url)
    del config["sources"]["github"]["reconcile"]
    result = make_app(config).test_cli_runner().invoke(args=["reconcile", "github"])
    assert result.exit_code == 2
    assert "source 'github' is not reconciled: add [sources.github.reconcile]" in result.output
    retained = make_app(sources(provider.url), IDEMHOOK_RETENTION="4d").test_cli_runner()
    result = retained.invoke(args=["reconcile", "stripe", "--since", "7d"])
    assert result.exit_code == 2
    assert "--since 7d reaches past IDEMHOOK_RETENTION" in result.output


def test_a_run_while_another_of_the_source_holds_the_fence_exits_1(make_app, provider, sql,
                                                                    db_url):
    app = make_app(sources(provider.url))
    engine = create_engine(db_url)
    now = datetime.now(UTC)
    held = reconcile_runs.begin(
        engine, source="stripe", started_by="worker", window_start=now, window_end=now,
        owner="elsewhere:42", lease=timedelta(minutes=5),
    )
    engine.dispose()
    result = app.test_cli_runner().invoke(args=["reconcile", "stripe"])
    assert result.exit_code == 1
    assert f"run {held} of 'stripe' is in progress (by elsewhere:42" in result.output
    assert "try again when it ends" in result.output
    assert provider.count("events") == 0
    assert sql("SELECT count(*) FROM processed_events") == [(0,)]


def test_the_fence_one_unfinished_run_per_source_one_run_per_slot_and_takeover(db_url, sql,
                                                                               make_app):
    make_app()  # the tables are emptied after the test
    engine = create_engine(db_url)
    now = datetime.now(UTC)
    window = {"window_start": now - timedelta(days=1), "window_end": now}
    slot = now.replace(microsecond=0)
    try:
        first = reconcile_runs.begin(engine, source="s", started_by="worker", owner="a:1",
                                     lease=timedelta(minutes=2), scheduled_for=slot, **window)
        assert first is not None
        # Another worker, the same slot or the next one: refused while the first runs.
        for scheduled in (slot, slot + timedelta(seconds=1), None):
            assert reconcile_runs.begin(engine, source="s", started_by="worker", owner="b:2",
                                        lease=timedelta(minutes=2), scheduled_for=scheduled,
                                        **window) is None
        # Another source is not held up.
        assert reconcile_runs.begin(engine, source="t", started_by="command", owner="b:2",
                                    lease=timedelta(minutes=2), **window) is not None
        assert reconcile_runs.renew(engine, first, timedelta(minutes=2), Counts(seen=5))
        assert reconcile_runs.finish(engine, first, "succeeded", Counts(5, 5, 0, 0), None)
        # Finished: its slot stays taken; the next slot is free.
        assert reconcile_runs.slot_taken(engine, "s", slot)
        assert reconcile_runs.begin(engine, source="s", started_by="worker", owner="b:2",
                                    lease=timedelta(minutes=2), scheduled_for=slot,
                                    **window) is None
        vanished = reconcile_runs.begin(engine, source="s", started_by="worker", owner="b:2",
                                        lease=timedelta(0), scheduled_for=slot + timedelta(1),
                                        **window)
        assert vanished is not None
        # Its lease ran out: the next run takes over, and the vanished one writes nothing.
        taker = reconcile_runs.begin(engine, source="s", started_by="command", owner="c:3",
                                     lease=timedelta(minutes=2), **window)
        assert taker is not None
        assert not reconcile_runs.renew(engine, vanished, timedelta(minutes=2), Counts())
        assert not reconcile_runs.finish(engine, vanished, "succeeded", Counts(), None)
        assert sql("SELECT outcome, error IS NOT NULL FROM reconcile_runs WHERE id = :i",
                   i=vanished) == [("abandoned", True)]
    finally:
        engine.dispose()


def test_a_failing_handler_counts_as_failed_and_the_next_run_applies_it_once_fixed(
    make_app, provider, sql
):
    app = make_app(sources(provider.url))
    sql("INSERT INTO test_failures VALUES ('evt_reconcile_001', 'the ledger is down')")
    first = app.test_cli_runner().invoke(args=["reconcile", "stripe", "--json"])
    assert first.exit_code == 0  # the run completed; the event's failure is recorded
    report = report_of(first.output)
    assert (report["applied_now"], report["failed"], report["failed_ids"]) == (
        2,
        1,
        ["evt_reconcile_001"],
    )
    assert sql("SELECT event_id, error FROM delivery_failures") == [
        (
            "evt_reconcile_001",
            "tests.plugins.reconciled:record raised RuntimeError: the ledger is down",
        )
    ]
    sql("DELETE FROM test_failures")
    second = report_of(app.test_cli_runner().invoke(args=["reconcile", "stripe", "--json"]).output)
    assert (second["already_applied"], second["applied_now"], second["applied"]) == (
        2,
        1,
        ["evt_reconcile_001"],
    )
    assert sql("SELECT event_id, count(*) FROM test_effects GROUP BY 1 ORDER BY 1") == [
        (f"evt_reconcile_{i:03d}", 1) for i in range(3)
    ]


def test_history_read_api_and_dashboard_show_the_runs(make_app, provider, sql):
    config = sources(provider.url)
    config["sources"]["github"]["reconcile"]["token"] = "ghp_wrong_token"
    app = make_app(config, IDEMHOOK_ADMIN_TOKEN=TOKEN)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["reconcile", "stripe"]).exit_code == 0
    assert runner.invoke(args=["reconcile", "stripe"]).exit_code == 0
    history = runner.invoke(args=["reconcile", "--history", "stripe"])
    lines = history.output.strip().splitlines()
    assert lines[0].split() == [
        "ID", "STARTED_AT", "STARTED_BY", "OUTCOME", "SEEN", "ALREADY", "RECOVERED", "FAILED",
        "ERROR",
    ]
    assert [line.split()[2:8] for line in lines[1:]] == [
        ["command", "succeeded", "3", "3", "0", "0"],
        ["command", "succeeded", "3", "0", "3", "0"],
    ]
    as_json = runner.invoke(args=["reconcile", "stripe", "--history", "--json"]).output
    assert [json.loads(line)["recovered"] for line in as_json.splitlines()] == [0, 3]

    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/reconcile/runs").status_code == 401
    runs = client.get("/reconcile/runs?source=stripe&limit=1", headers=auth).get_json()
    assert [r["recovered"] for r in runs["runs"]] == [0] and runs["next"]
    older = client.get(f"/reconcile/runs?source=stripe&cursor={runs['next']}", headers=auth)
    assert [r["recovered"] for r in older.get_json()["runs"]] == [3]
    conforms(client.get("/reconcile/runs?source=stripe&limit=1", headers=auth), "/reconcile/runs")
    conforms(client.get("/reconcile", headers=auth), "/reconcile")
    summary = {s["source"]: s for s in client.get("/reconcile", headers=auth).get_json()["sources"]}
    assert set(summary) == {"crm", "github", "stripe"}
    assert summary["stripe"]["recovered_24h"] == 3
    assert summary["stripe"]["last_run"]["outcome"] == "succeeded"
    assert summary["github"]["last_run"] is None and summary["crm"]["last_run"] is None
    bad = client.get("/reconcile/runs?when=now", headers=auth)
    assert (bad.status_code, bad.get_json()["error"]) == (400, "invalid_parameter")

    # The dashboard's overview: per source, last run, recovered in 24 h, last error.
    assert runner.invoke(args=["reconcile", "github"]).exit_code == 1  # a refused token
    browser = Browser(app.test_client())
    browser.login()
    page = browser.get("/dashboard").text
    assert "<h2>Reconcile</h2>" in page
    row = _row(page, "stripe")
    assert "succeeded" in row and row.endswith("| 3 | -")
    github = _row(page, "github")
    assert "refused" in github
    assert "the token was refused (HTTP 401: invalid or revoked)" in github
    assert "ghp_wrong_token" not in page
    event = browser.get("/dashboard/events/stripe/evt_reconcile_000").text
    assert "(recovered by reconcile)" in event


def _row(page: str, first_cell: str) -> str:
    from tests.dashboard.test_views import _row as row_of

    section = page.split("<h2>Reconcile</h2>", 1)[1]
    return row_of(section, first_cell)


def test_a_plugin_reconciler_finds_changes_of_a_provider_without_an_event_log(
    make_app, sql, db_url, monkeypatch
):
    """docs/reconcile.md's example: a CRM searched for contacts modified in the window."""
    monkeypatch.setenv(CRM_DATABASE_VARIABLE, db_url.render_as_string(hide_password=False))
    sql(
        "CREATE TABLE IF NOT EXISTS test_crm_contacts (id VARCHAR(64) PRIMARY KEY, "
        "version INTEGER NOT NULL, changed_at TIMESTAMP WITH TIME ZONE NOT NULL)"
    )
    try:
        now = datetime.now(UTC)
        for contact, version, ago in (("c1", 3, 600), ("c2", 1, 1200), ("c3", 7, 9 * 86400)):
            sql("INSERT INTO test_crm_contacts VALUES (:i, :v, :t)", i=contact, v=version,
                t=now - timedelta(seconds=ago))
        app = make_app(sources("https://api.example.com"))
        client = app.test_client()
        # c1's change was delivered live; c2's webhook never came; c3 is outside the lookback.
        live = deliver(client, "crm", {"event_id": "c1:3", "type": "contact.updated"})
        assert live.get_json()["status"] == "processed"
        result = app.test_cli_runner().invoke(args=["reconcile", "crm", "--json"])
        assert result.exit_code == 0, result.output
        report = report_of(result.output)
        assert (report["seen"], report["already_applied"], report["applied"]) == (2, 1, ["c2:1"])
        assert sql("SELECT event_id, received_via FROM processed_events ORDER BY 1") == [
            ("c1:3", "delivery"),
            ("c2:1", "reconcile"),
        ]
        late = deliver(client, "crm", {"event_id": "c2:1", "type": "contact.updated"})
        assert late.get_json()["status"] == "duplicate"
        assert sql("SELECT event_id, count(*) FROM test_effects GROUP BY 1 ORDER BY 1") == [
            ("c1:3", 1),
            ("c2:1", 1),
        ]
    finally:
        sql("DROP TABLE test_crm_contacts")


def test_a_dry_run_changes_nothing_and_lists_what_it_would_apply(make_app, provider, sql):
    app = make_app(sources(provider.url))
    result = app.test_cli_runner().invoke(args=["reconcile", "stripe", "--dry-run"])
    assert result.exit_code == 0
    assert "stripe (dry run, nothing changed): saw 3 events" in result.output
    assert "0 already applied, 3 would be applied" in result.output
    assert "would apply: evt_reconcile_002 evt_reconcile_001 evt_reconcile_000" in result.output
    for table in ("processed_events", "reconcile_runs", "test_effects", "delivery_failures"):
        assert sql(f"SELECT count(*) FROM {table}") == [(0,)]


def test_github_refused_token_and_missing_permission(make_app, sql):
    with FakeProvider() as fake:
        config = sources(fake.url)
        fake.fault("deliveries", 1, 403, {}, {"message": "Resource not accessible by integration"})
        app = make_app(config)
        result = app.test_cli_runner().invoke(args=["reconcile", "github"])
    assert result.exit_code == 1
    assert "github: the token was refused (HTTP 403: it lacks the permission to read this)" in (
        result.output
    )
    assert GITHUB_TOKEN not in result.output
    assert STRIPE_KEY not in result.output


def test_a_refused_key_ends_the_run_with_one_line_counted_and_never_shown(
    sql, make_app, caplog
):
    events = [stripe_event(i, time.time() - 3600) for i in range(3)]
    with FakeProvider(stripe_events=events) as fake:
        config = sources(fake.url)
        config["sources"]["stripe"]["reconcile"]["api_key"] = "sk_test_refused_secret_key_123"
        config["sources"]["github"]["reconcile"]["token"] = "ghp_refused_secret_token_456"
        app = make_app(config)
        with caplog.at_level("DEBUG"):
            stripe_run = app.test_cli_runner().invoke(args=["reconcile", "stripe"])
            github_run = app.test_cli_runner().invoke(args=["reconcile", "github", "--json"])
        client = app.test_client()
        scraped = client.get("/metrics").get_data(as_text=True)

    assert stripe_run.exit_code == 1
    assert "stripe: the API key was refused (HTTP 401: invalid or revoked)" in stripe_run.output
    assert github_run.exit_code == 1
    assert report_of(github_run.output)["error"] == (
        "the token was refused (HTTP 401: invalid or revoked)"
    )
    runs = sql("SELECT source, outcome, seen, recovered, error FROM reconcile_runs ORDER BY id")
    assert runs == [
        ("stripe", "refused", 0, 0, "the API key was refused (HTTP 401: invalid or revoked)"),
        ("github", "refused", 0, 0, "the token was refused (HTTP 401: invalid or revoked)"),
    ]
    assert 'idemhook_reconcile_runs_total{outcome="refused",source="stripe"} 1.0' in scraped
    assert sql("SELECT count(*) FROM processed_events") == [(0,)]
    everything = stripe_run.output + github_run.output + caplog.text + scraped
    for secret in ("refused_secret_key_123", "sk_test_re", "refused_secret_token_456"):
        assert secret not in everything


def test_prune_keeps_claims_for_idemhook_retention_which_lookbacks_were_checked_against(
    make_app, sql
):
    runner = make_app(IDEMHOOK_RETENTION="30d").test_cli_runner()
    sql(
        "INSERT INTO processed_events (source, event_id, status, received_at, last_seen_at) "
        "VALUES ('acme', 'old', 'processed', now() - interval '40 days', now()), "
        "('acme', 'recent', 'processed', now() - interval '10 days', now())"
    )
    short = runner.invoke(args=["events", "prune", "--older-than", "7d"])
    assert short.exit_code == 2
    assert "--older-than 7d is shorter than IDEMHOOK_RETENTION (30d)" in short.output
    assert sql("SELECT count(*) FROM processed_events") == [(2,)]
    stripped = runner.invoke(args=["events", "prune", "--older-than", "7d", "--payloads-only"])
    assert stripped.exit_code == 0, stripped.output
    pruned = runner.invoke(args=["events", "prune"])  # --older-than IDEMHOOK_RETENTION
    assert pruned.exit_code == 0, pruned.output
    assert "pruned 1 events" in pruned.output
    assert sql("SELECT event_id FROM processed_events") == [("recent",)]
    unset = make_app().test_cli_runner().invoke(args=["events", "prune"])
    assert unset.exit_code == 2
    assert "give --older-than (e.g. 30d) or set IDEMHOOK_RETENTION" in unset.output


def test_a_rate_limit_longer_than_a_run_waits_ends_it_failed_saying_until_when(
    make_app, provider, sql
):
    provider.fault("events", 1, 429, {"Retry-After": "3600"})
    result = make_app(sources(provider.url)).test_cli_runner().invoke(
        args=["reconcile", "stripe", "--json"]
    )
    assert result.exit_code == 1
    error = report_of(result.output)["error"]
    assert error.startswith("rate limited (HTTP 429): the provider asks to wait 3600 s (until ")
    assert error.endswith("longer than a run waits (60 s); the next run goes on")
    assert provider.count("events") == 1  # it did not hammer the API
    assert sql("SELECT outcome, error FROM reconcile_runs") == [("failed", error)]
