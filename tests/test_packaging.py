"""pyproject.toml lists every package by hand (migrations/ ships as app._migrations)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_of_the_tree_is_shipped() -> None:
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("app", "idemhook")
        for path in (ROOT / top).rglob("__init__.py")
    }
    mapped = set()
    for name, folder in CONFIG["package-dir"].items():
        mapped.add(name)
        mapped |= {
            f"{name}.{sub.name}"
            for sub in (ROOT / folder).iterdir()
            if sub.is_dir() and any(sub.glob("*.py"))
        }
    assert set(CONFIG["packages"]) == found | mapped


def test_idemhooks_own_migrations_ship_in_the_package() -> None:
    assert CONFIG["package-dir"] == {"app._migrations": "migrations"}
    assert (ROOT / "migrations" / "env.py").exists()
    assert "script.py.mako" in CONFIG["package-data"]["app._migrations"]
