"""pytest plugin for handler authors: a real receiver on a fresh PostgreSQL database per test.

Installed with idemhook (entry point ``pytest11``), so its fixtures need no import::

    def test_order_paid(idemhook):
        hook = idemhook("webhooks.toml")            # or the same content as a dict
        response = hook.deliver("shop", {"id": "evt_1", "type": "order.paid"})
        assert response.json["status"] == "processed"
        hook.assert_processed("shop", "evt_1", result={"order": 7})

Each test gets its own database, copied from a template that the real Alembic
migrations built once per session (idemhook's revisions plus every plugin's own,
see docs/plugins.md), so tests are isolated and a plugin's tables exist.
The server comes from :func:`idemhook.testing.postgres.server_url`: ``TEST_DATABASE_URL``,
a server on 127.0.0.1:5432, or a throwaway cluster started for the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from idemhook.testing.postgres import NoPostgres, create_database, drop_database, server_url
from idemhook.testing.receiver import Kit, build

__all__ = ["Kit", "Templates"]


class Templates:
    """Migrated template databases, one per set of plugin migration folders."""

    def __init__(self, server: URL) -> None:
        self.server = server
        self._by_folders: dict[tuple[str, ...], URL] = {}

    def database_for(self, config: Mapping[str, Any] | str | Path, settings: dict) -> URL:
        """A new database holding the schema that ``config``'s plugins need."""
        # Building an app connects to nothing: it only tells which migrations apply.
        probe = build(self.server.set(database="postgres"), config, settings, migrate=False)
        key = tuple(str(folder) for folder in probe.extensions["idemhook.registry"].migrations)
        probe.extensions["idemhook.db"].engine.dispose()
        template = self._by_folders.get(key)
        if template is None:
            template = create_database(self.server, prefix="idemhook_template")
            build(template, config, settings, migrate=True).extensions[
                "idemhook.db"
            ].engine.dispose()
            self._by_folders[key] = template
        return create_database(self.server, prefix="idemhook_test", template=template)

    def drop_all(self) -> None:
        for template in self._by_folders.values():
            drop_database(template)
        self._by_folders.clear()


@pytest.fixture(scope="session")
def idemhook_pg_server() -> Iterator[URL]:
    """A reachable PostgreSQL server (found, or a throwaway cluster started for the session)."""
    try:
        url, cluster = server_url()
    except NoPostgres as exc:
        pytest.exit(str(exc), returncode=3)
    yield url
    if cluster is not None:
        cluster.destroy()


@pytest.fixture(scope="session")
def idemhook_templates(idemhook_pg_server: URL) -> Iterator[Templates]:
    """Template databases migrated once per session (idemhook's and the plugins' revisions)."""
    templates = Templates(idemhook_pg_server)
    yield templates
    templates.drop_all()


@pytest.fixture
def idemhook(idemhook_templates: Templates) -> Iterator[Callable[..., Kit]]:
    """Build receivers from a sources file path or dict, each on its own fresh database."""
    kits: list[Kit] = []

    def make(config: Mapping[str, Any] | str | Path, **settings: Any) -> Kit:
        url = idemhook_templates.database_for(config, settings)
        kit = Kit(build(url, config, settings, migrate=False))
        kits.append(kit)
        return kit

    yield make
    for kit in kits:
        kit.close()
        drop_database(kit.url)
