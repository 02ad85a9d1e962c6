"""Alembic, driven from the app: ``idemhook db upgrade`` works from any directory."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask

from idemhook._store.database import get_db, migration_engine

#: idemhook's own revisions: inside the package when installed from a wheel (pyproject maps
#: the repository's migrations/ to idemhook/_migrations), the repository's folder in a
#: clone (beside app/, the package's folder there).
_PACKAGE = Path(__file__).resolve().parent.parent
_PACKAGED = _PACKAGE / "_migrations"
_CLONE = _PACKAGE.parent / "migrations"
MIGRATIONS = _PACKAGED if _PACKAGED.is_dir() else _CLONE


def alembic_config(app: Flask) -> Config:
    if not (MIGRATIONS / "env.py").exists():
        raise RuntimeError(f"idemhook's migrations are missing: expected them in {MIGRATIONS}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Plugins' own revision folders (app.plugins: IDEMHOOK_MIGRATIONS, idemhook.migrations).
    registry = app.extensions.get("idemhook.registry")
    plugin_folders = [str(p) for p in registry.migrations] if registry is not None else []
    if plugin_folders:
        locations = [str(MIGRATIONS / "versions"), *plugin_folders]
        config.set_main_option("path_separator", "os")
        # ConfigParser interpolates "%": escape it in folder names.
        config.set_main_option(
            "version_locations", os.pathsep.join(p.replace("%", "%%") for p in locations)
        )
    config.attributes["engine"] = migration_engine(app)
    return config


def upgrade(app: Flask, revision: str = "heads") -> None:
    command.upgrade(alembic_config(app), revision)


def downgrade(app: Flask, revision: str) -> None:
    command.downgrade(alembic_config(app), revision)


def scripts(app: Flask) -> ScriptDirectory:
    """The migration scripts this code ships (read once per app: they never change)."""
    found = app.extensions.get("idemhook.scripts")
    if found is None:
        found = app.extensions["idemhook.scripts"] = ScriptDirectory.from_config(
            alembic_config(app)
        )
    return found


def heads(app: Flask) -> set[str]:
    return set(scripts(app).get_heads())


def compare(app: Flask, applied: set[str]) -> tuple[set[str], set[str]]:
    """Return (our revisions the database lacks, applied revisions this code does not know).

    Unknown applied revisions mean a newer release has migrated the database (a
    rolling deploy); their history is not in this code's scripts, so what they
    build on cannot be checked here: the caller treats that as "ahead", not "behind".
    """
    script = scripts(app)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = applied - known
    covered: set[str] = set()
    for revision in applied & known:
        covered |= {rev.revision for rev in script.iterate_revisions(revision, "base")}
    return heads(app) - covered, unknown


def current(app: Flask) -> set[str]:
    with get_db(app).engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads())
