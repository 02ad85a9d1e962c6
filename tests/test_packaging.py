"""pyproject.toml lists every package by hand: app/ ships as ``idemhook``, migrations/ as
``idemhook._migrations``."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_of_the_tree_is_shipped() -> None:
    # Every folder that holds a file: modules, or data (templates, the stylesheet).
    found = set()
    for name, folder in CONFIG["package-dir"].items():
        for path in (ROOT / folder).rglob("*"):
            parts = path.parent.relative_to(ROOT / folder).parts
            if path.is_file() and "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    assert set(CONFIG["packages"]) == found


def test_idemhooks_own_migrations_ship_in_the_package() -> None:
    assert CONFIG["package-dir"] == {"idemhook": "app", "idemhook._migrations": "migrations"}
    assert (ROOT / "migrations" / "env.py").exists()
    assert "script.py.mako" in CONFIG["package-data"]["idemhook._migrations"]
