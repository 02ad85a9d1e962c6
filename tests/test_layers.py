"""The package's structure: layers that import only downwards, and no import cycle.

The contracts are import-linter's, in pyproject.toml (``make lint`` runs them too). Every
import counts: inside functions and under ``TYPE_CHECKING`` as well (grimp reads them all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
    )


def _copy_of_the_package(tmp_path: Path) -> Path:
    """The package as it is in the tree, importable as ``idemhook`` from ``tmp_path``."""
    shutil.copytree(ROOT / "app", tmp_path / "idemhook",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_every_contract_is_kept(tmp_path):
    done = _lint(_copy_of_the_package(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    parent = _copy_of_the_package(tmp_path)
    # The store reaching up into the engine, as schemes once reached up to the claim.
    (parent / "idemhook" / "_store" / "upward.py").write_text(
        "from idemhook._engine.claim import Claimer\n"
    )
    done = _lint(parent)
    assert done.returncode != 0
    assert "idemhook._store is not allowed to import idemhook._engine" in done.stdout
    assert "idemhook._store.upward -> idemhook._engine.claim" in done.stdout


def test_no_module_of_the_package_is_in_an_import_cycle():
    graph = grimp.build_graph("idemhook", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.find_shortest_chain(importer=imported, imported=module) is not None:
                cycles.append((module, imported))
    assert cycles == []
