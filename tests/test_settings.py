"""Start-up configuration: database URLs and the sources file fail fast and name the key."""

from __future__ import annotations

import pytest

from idemhook import create_app
from idemhook._config.settings import normalise_database_url
from idemhook._values.errors import ConfigError


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("postgres://u:p@db.example/app", "postgresql+psycopg2"),
        ("postgresql://u:p@db.example/app", "postgresql+psycopg2"),
        ("postgresql+psycopg2://u@db.example/app", "postgresql+psycopg2"),
        ("sqlite:///instance/idemhook.db", "sqlite"),
    ],
)
def test_database_urls_are_normalised_to_the_shipped_driver(given, driver):
    url = normalise_database_url(given)
    assert url.drivername == driver
    assert url.database in ("app", "instance/idemhook.db")


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg", "pg8000"])
def test_other_postgresql_drivers_are_refused_at_start_up_naming_the_supported_one(driver):
    # psycopg 3 (SQLAlchemy 2.1's default) starts and answers /readyz, then refuses the
    # claim's several-statements-per-round-trip on every delivery: refuse it up front.
    with pytest.raises(ConfigError) as info:
        url = f"postgresql+{driver}://u:secret@db.example/app"
        create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": {}})
    message = str(info.value)
    assert f"postgresql+{driver}" in message and "postgresql+psycopg2://" in message
    assert "secret" not in message


def test_missing_database_url_stops_start_up(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        create_app({"IDEMHOOK_CONFIG": {}})


def test_unsupported_database_is_refused_without_echoing_the_password():
    with pytest.raises(ConfigError) as info:
        normalise_database_url("mysql://root:hunter2@db/app")
    assert "mysql" in str(info.value) and "hunter2" not in str(info.value)


def test_bad_numeric_setting_names_the_key(monkeypatch):
    monkeypatch.setenv("IDEMHOOK_MAX_BODY_BYTES", "lots")
    with pytest.raises(ConfigError, match="IDEMHOOK_MAX_BODY_BYTES"):
        create_app({"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": {}})


def source(**overrides):
    base = {"scheme": "hmac-sha256", "secret": "s", "event_id": "body:id"}
    return {"sources": {"acme": {**base, **overrides}}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (source(scheme="carrier-pigeon"), r"\[sources.acme\] scheme: unknown scheme"),
        (
            source(secret="env:IDEMHOOK_TEST_UNSET"),
            r"\[sources.acme\] secret: environment variable IDEMHOOK_TEST_UNSET is not set",
        ),
        (source(secret=None), r"\[sources.acme\] secret: missing"),
        (source(event_id="id"), r"\[sources.acme\] event_id: expected 'body:"),
        (source(event_id="query:id"), r"\[sources.acme\] event_id: unknown locator kind"),
        (source(event_type="body:a..b"), r"\[sources.acme\] event_type: .* empty path segment"),
        (source(batch="sometimes"), r"\[sources.acme\] batch"),
        (source(max_body_bytes=0), r"\[sources.acme\] max_body_bytes"),
        (source(signiture_header="X"), r"\[sources.acme\]: unknown key\(s\) signiture_header"),
        (
            {"sources": {"acme": {"scheme": "none", "event_id": "body:id"}}},
            r"\[sources.acme\] scheme: 'none' .* allow_unverified",
        ),
        ({"sources": {"no/slash": {"scheme": "none"}}}, r"\[sources.no/slash\]"),
        (
            {"plugins": ["tests.plugins.does_not_exist"], "sources": {}},
            r"plugin 'tests.plugins.does_not_exist' .* failed to import",
        ),
        (
            {"plugins": ["tests.plugins.recorder"], "sources": {}},
            r"recorder:record is registered for source '\w+', which is not in the sources file",
        ),
    ],
)
def test_config_errors_stop_start_up_naming_source_and_key(monkeypatch, config, message):
    monkeypatch.delenv("IDEMHOOK_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=message):
        create_app({"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": config})


def test_secret_from_environment(monkeypatch):
    monkeypatch.setenv("ACME_SECRET", "from-env")
    app = create_app(
        {"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": source(secret="env:ACME_SECRET")}
    )
    assert app.extensions["idemhook.receiver"].sources["acme"].scheme.secrets == ("from-env",)


def test_sources_file_is_read_from_idemhook_config(tmp_path, monkeypatch):
    path = tmp_path / "hooks.toml"
    path.write_text('[sources.acme]\nscheme = "hmac-sha256"\nsecret = "s"\nevent_id = "body:id"\n')
    monkeypatch.setenv("IDEMHOOK_CONFIG", str(path))
    app = create_app({"DATABASE_URL": "sqlite://"})
    assert list(app.extensions["idemhook.receiver"].sources) == ["acme"]


def test_named_sources_file_that_is_missing_stops_start_up(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        create_app({"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": str(tmp_path / "no.toml")})


def test_invalid_toml_stops_start_up(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[sources.acme\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        create_app({"DATABASE_URL": "sqlite://", "IDEMHOOK_CONFIG": str(path)})
