"""Fixtures: a real PostgreSQL database built by the real migrations, apps, clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from idemhook import create_app
from idemhook._store import migrate
from idemhook.testing import postgres
from tests.plugins import queued, recorder, versioned

SECRET = "test-secret"

SOURCES = {
    "plugins": ["tests.plugins.recorder"],
    "sources": {
        "acme": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "event_type": "body:type",
        },
        "batched": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "event_type": "body:type",
            "batch": "array",
            "max_batch": 5,
        },
        "open": {
            "scheme": "none",
            "allow_unverified": True,
            "event_id": "header:X-Event-Id",
        },
    },
}

TABLES = (
    "processed_events",
    "delivery_failures",
    "outbox_messages",
    "event_queue",
    "reconcile_runs",
    "source_secrets",
    "secret_matches",
    "test_effects",
    "test_failures",
    "test_applied",
    "object_versions",
    "object_version_floors",
    "test_objects",
    "test_object_log",
    "test_audit",
    "rejected_deliveries",
    "source_pauses",
)


def pytest_configure(config: pytest.Config) -> None:
    # The test kit's fixtures come from its pytest11 entry point; an install that
    # predates it (no `make install` since) still finds them.
    if not config.pluginmanager.has_plugin("idemhook"):
        config.pluginmanager.import_plugin("idemhook.testing.pytest_plugin")


@pytest.fixture(scope="session")
def pg_server(idemhook_pg_server: URL) -> URL:
    """A reachable PostgreSQL server: the test kit's (found, or a throwaway cluster)."""
    return idemhook_pg_server


def _migrate(url: URL | str) -> None:
    app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": {}})
    migrate.upgrade(app)
    engine = app.extensions["idemhook.db"].engine
    with engine.begin() as conn:
        dialect = engine.dialect.name
        for ddl in (*recorder.TABLES, *queued.tables(dialect), *versioned.tables(dialect)):
            conn.execute(text(ddl))
    engine.dispose()


@pytest.fixture(scope="session")
def pg_url(pg_server: URL) -> Iterator[URL]:
    """A fresh database for this run, schema built by the real Alembic migrations."""
    url = postgres.create_database(pg_server)
    _migrate(url)
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> URL:
    """A SQLite file migrated by the same migrations (the demo's backend)."""
    url = make_url(f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'idemhook.db'}")
    _migrate(url)
    return url


@pytest.fixture
def db_url(pg_url: URL) -> URL:
    """The database the ``app`` fixture uses; PostgreSQL unless a module overrides it."""
    return pg_url


def _clean(url: URL) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))
    engine.dispose()


@pytest.fixture
def make_app(db_url: URL) -> Iterator:
    """Build apps on the test database from a sources dict; tables are emptied after."""
    built: list[Flask] = []

    def make(config: dict | None = None, **settings) -> Flask:
        app = create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": config or SOURCES, **settings})
        app.config["TESTING"] = True
        built.append(app)
        return app

    yield make
    for app in built:
        matches = app.extensions.get("idemhook.matches")
        if matches is not None:  # which secret verified: written now, before the cleanup
            matches.close()
        app.extensions["idemhook.db"].engine.dispose()
    _clean(db_url)


@pytest.fixture
def app(make_app) -> Flask:
    """The receiver with the test sources and the recorder plugin."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of ``app``."""
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    """A CLI runner for ``app``'s commands."""
    return app.test_cli_runner()


@pytest.fixture
def sql(db_url: URL) -> Iterator:
    """Run one SQL statement on the test database and return all rows."""
    engine = create_engine(db_url)

    def run(statement: str, **params):
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return result.all() if result.returns_rows else None

    yield run
    engine.dispose()
