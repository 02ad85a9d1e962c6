"""Plugin discovery and start-up checks: one loading path, loud refusals, `handlers list`."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from idemhook import create_app
from idemhook._engine.registry import ENTRY_POINT_GROUP, MIGRATIONS_GROUP
from idemhook._values.errors import ConfigError

SOURCES = {
    "shop": {
        "scheme": "hmac-sha256",
        "secret": "s",
        "event_id": "body:id",
        "event_type": "body:type",
    },
    "shop-batch": {
        "scheme": "hmac-sha256",
        "secret": "s",
        "event_id": "body:id",
        "event_type": "body:type",
        "batch": "array",
    },
    "other": {"scheme": "none", "allow_unverified": True, "event_id": "body:id"},
}


def build(plugins, sources=SOURCES):
    # Building an app connects to nothing; SQLite keeps these tests off the server.
    return create_app(
        {"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": {"plugins": plugins, "sources": sources}}
    )


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """Write plugin modules into an importable folder: ``modules(name=source_text)``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(**files: str) -> None:
        for name, source in files.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))

    return write


@pytest.fixture
def entry_points(monkeypatch):
    """Pretend packages are installed with the given entry points (nothing is installed)."""
    installed: list[importlib.metadata.EntryPoint] = []
    real = importlib.metadata.entry_points

    def fake(**params):
        if params.get("group") in (ENTRY_POINT_GROUP, MIGRATIONS_GROUP):
            return [ep for ep in installed if ep.group == params["group"]]
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)

    def add(name: str, value: str, group: str = ENTRY_POINT_GROUP) -> None:
        installed.append(importlib.metadata.EntryPoint(name, value, group))

    return add


def names(app):
    return [
        (r.source, r.pattern, r.name) for r in app.extensions["idemhook.registry"].registrations
    ]


def test_module_that_fails_to_import_stops_start_up_naming_it(modules):
    modules(crm_sync="import hubspot_sdk_that_is_not_installed\n")
    with pytest.raises(ConfigError, match=r"plugin 'crm_sync' \(from plugins\) failed to import"):
        build(["crm_sync"])


def test_missing_module_stops_start_up_naming_it():
    with pytest.raises(ConfigError, match="plugin 'no_such_plugin_module'"):
        build(["no_such_plugin_module"])


def test_module_without_handlers_stops_start_up(modules):
    modules(empty_plugin="def forgot_the_decorator(event, db):\n    return 1\n")
    with pytest.raises(ConfigError, match="plugin 'empty_plugin' .* registers no handlers"):
        build(["empty_plugin"])


def test_handler_with_the_wrong_signature_stops_start_up(modules):
    modules(
        one_arg="""
        from idemhook import handler

        @handler("shop", "order.paid")
        def paid(event):
            return None
        """
    )
    with pytest.raises(ConfigError, match=r"handler one_arg:paid must accept \(event, db\)"):
        build(["one_arg"])


def test_handler_for_an_unknown_source_stops_start_up(modules):
    modules(
        typo="""
        from idemhook import handler

        @handler("shpo", "order.paid")
        def paid(event, db):
            return None
        """
    )
    with pytest.raises(ConfigError, match="typo:paid is registered for source 'shpo'") as info:
        build(["typo"])
    assert "configured: other, shop, shop-batch" in str(info.value)


def test_entry_point_plugins_load_through_the_same_path(entry_points):
    entry_points("ledger", "tests.plugins.ledger")
    app = build([])
    assert ("shop", "order.*", "tests.plugins.ledger:first") in names(app)
    assert ("*", "*", "tests.plugins.ledger:audit") in names(app)


def test_entry_point_may_name_one_function(entry_points):
    entry_points("audit", "tests.plugins.ledger:audit")
    assert names(build([])) == [("*", "*", "tests.plugins.ledger:audit")]


def test_broken_entry_point_stops_start_up_naming_it(entry_points):
    entry_points("crm", "crm_plugin_not_installed.handlers")
    with pytest.raises(
        ConfigError,
        match=r"plugin 'crm' \(entry point 'crm_plugin_not_installed.handlers' in "
        r"idemhook.handlers\) failed to import",
    ):
        build([])


def test_module_listed_and_installed_registers_its_handlers_once(entry_points):
    entry_points("ledger", "tests.plugins.ledger")
    app = build(["tests.plugins.ledger"])
    assert names(app) == [
        ("shop", "order.*", "tests.plugins.ledger:first"),
        ("shop-batch", "order.*", "tests.plugins.ledger:first"),
        ("shop", "order.*", "tests.plugins.ledger:second"),
        ("shop-batch", "order.*", "tests.plugins.ledger:second"),
        ("*", "*", "tests.plugins.ledger:audit"),
    ]
    assert len(app.extensions["idemhook.registry"].migrations) == 1


def test_migrations_entry_point_adds_a_version_location(entry_points):
    entry_points("ledger", "tests.plugins.ledger:IDEMHOOK_MIGRATIONS", MIGRATIONS_GROUP)
    app = build([])
    [folder] = app.extensions["idemhook.registry"].migrations
    assert folder.name == "ledger_migrations"


def test_migrations_entry_point_to_a_missing_folder_stops_start_up(entry_points, modules):
    modules(gone="IDEMHOOK_MIGRATIONS = '/nonexistent/migrations'\n")
    entry_points("gone", "gone:IDEMHOOK_MIGRATIONS", MIGRATIONS_GROUP)
    with pytest.raises(ConfigError, match="plugin 'gone' .* does not exist"):
        build([])


def test_handlers_list_prints_source_pattern_and_handler(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    app = build(["tests.plugins.ledger"])
    result = app.test_cli_runner().invoke(args=["handlers", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:6] == [
        "SOURCE      TYPE     HANDLER",
        "shop        order.*  tests.plugins.ledger:first",
        "shop-batch  order.*  tests.plugins.ledger:first",
        "shop        order.*  tests.plugins.ledger:second",
        "shop-batch  order.*  tests.plugins.ledger:second",
        "*           *        tests.plugins.ledger:audit",
    ]
    assert lines[6] == "plugin migrations: tests/plugins/ledger_migrations"  # run from the root


def test_handlers_list_without_handlers_says_how_to_add_one():
    result = build([]).test_cli_runner().invoke(args=["handlers", "list"])
    assert result.exit_code == 0
    assert result.output.startswith("no handlers registered")


def test_console_script_refuses_a_broken_plugin_naming_it(tmp_path):
    (tmp_path / "crm_sync.py").write_text("import hubspot_sdk_that_is_not_installed\n")
    (tmp_path / "webhooks.toml").write_text('plugins = ["crm_sync"]\n')
    script = Path(sys.executable).with_name("idemhook")
    env = {**os.environ, "DATABASE_URL": "sqlite:///x.db", "IDEMHOOK_CONFIG": "webhooks.toml"}
    run = subprocess.run(
        [str(script), "handlers", "list"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 2  # a configuration problem, like every one the CLI reports
    assert run.stderr.startswith("Error: plugin 'crm_sync' (from plugins) failed to import: ")
    assert "hubspot_sdk_that_is_not_installed" in run.stderr
    assert "Traceback" not in run.stderr


# -- a plugin's own routes (IDEMHOOK_BLUEPRINT) ------------------------------------------------

API = {"scheme": "idempotency-key", "auth": "bearer", "secret": "api-token-0123456789"}


def test_a_blueprint_alone_is_a_plugin_and_its_routes_are_served(modules, monkeypatch):
    modules(
        status_page="""
        from flask import Blueprint

        IDEMHOOK_BLUEPRINT = Blueprint("status_page", __name__)


        @IDEMHOOK_BLUEPRINT.get("/v1/status")
        def status():
            return {"ok": True}
        """
    )
    app = build(["status_page"])
    assert app.test_client().get("/v1/status").json == {"ok": True}
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    listed = app.test_cli_runner().invoke(args=["handlers", "list"])
    assert "plugin route: GET /v1/status  status_page.status" in listed.output.splitlines()


def test_a_blueprint_attribute_that_is_not_a_blueprint_stops_start_up(modules):
    modules(not_bp="IDEMHOOK_BLUEPRINT = {'/v1/x': print}\n")
    with pytest.raises(
        ConfigError, match=r"plugin 'not_bp' .*: IDEMHOOK_BLUEPRINT must be a flask.Blueprint"
    ):
        build(["not_bp"])


@pytest.mark.parametrize(
    ("name", "rule", "error"),
    [
        ("events_too", "/events", "route GET /events is already served by api.list_events"),
        ("api", "/v1/mine", ": .*'api'"),  # the read API's blueprint name
    ],
)
def test_a_blueprint_that_takes_a_route_or_name_stops_start_up(modules, name, rule, error):
    module = f"taker_{name}"
    plugin = f"""
        from flask import Blueprint

        IDEMHOOK_BLUEPRINT = Blueprint({name!r}, __name__)


        @IDEMHOOK_BLUEPRINT.get({rule!r})
        def mine():
            return {{}}
        """
    modules(**{module: plugin})
    with pytest.raises(ConfigError, match=rf"plugin '{module}' .*: IDEMHOOK_BLUEPRINT ?{error}"):
        build([module], {**SOURCES, "api": API})


def test_an_api_path_that_a_plugin_route_serves_stops_start_up(modules):
    modules(
        poster="""
        from flask import Blueprint

        IDEMHOOK_BLUEPRINT = Blueprint("poster", __name__)


        @IDEMHOOK_BLUEPRINT.post("/v1/emails")
        def post():
            return {}
        """
    )
    with pytest.raises(ConfigError, match=r"\[sources.api\] path: '/v1/emails' is already"):
        build(["poster"], {"api": {**API, "path": "/v1/emails"}})


def test_an_api_view_of_a_source_that_is_not_an_api_stops_start_up(modules):
    modules(
        typo_view="""
        from flask import Blueprint

        from idemhook import api_view

        IDEMHOOK_BLUEPRINT = Blueprint("typo_view", __name__)


        @IDEMHOOK_BLUEPRINT.get("/v1/things/<n>")
        @api_view("shop")
        def thing(client, db, n):
            return {}
        """
    )
    with pytest.raises(
        ConfigError,
        match=r"route typo_view.thing: @api_view\('shop'\) names no idempotency-key source "
        r"of the sources file \(its idempotency-key sources: api\)",
    ):
        build(["typo_view"], {**SOURCES, "api": API})


def test_a_blueprint_listed_and_installed_is_registered_once(entry_points):
    entry_points("email_api", "examples.email_api.handlers")
    app = build(["examples.email_api.handlers"], {"emails": API})
    rules = [r.rule for r in app.url_map.iter_rules() if r.endpoint.startswith("email_api.")]
    assert rules == ["/v1/emails/<email_id>"]
