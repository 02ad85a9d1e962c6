"""``idemhook`` is the public API: plugin authors, the docs and the examples use only it."""

from __future__ import annotations

import importlib.metadata
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import idemhook
import idemhook.testing
import idemhook.testing.pytest_plugin

ROOT = Path(__file__).resolve().parent.parent
#: An import of the repository's directory name (``app``) or of a private module of
#: ``idemhook`` (``idemhook._engine``...), in Python or in a docs' code block.
PRIVATE_IMPORT = re.compile(
    r"^\s*(from (app|idemhook\._\w+)(\.| import)|import (app|idemhook\._\w+)\b)", re.M
)
PUBLIC = ["Event", "Ignore", "Message", "Reject", "Response", "Window", "api_view",
          "create_app", "handler", "reconciler", "sender"]


def test_the_public_api_is_what_the_package_exports() -> None:
    assert sorted(idemhook.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(idemhook, name).__module__.startswith("idemhook"), name
    assert sorted(idemhook.testing.__all__) == ["ANY", "Kit", "deliver", "signed"]
    # Everything else is internal, and private by name.
    public_modules = {
        m.name for m in pkgutil.iter_modules(idemhook.__path__) if not m.name.startswith("_")
    }
    assert public_modules == {"testing"}


def test_version_is_the_installed_packages() -> None:
    assert idemhook.__version__ == importlib.metadata.version("idemhook")


def test_the_pytest_plugin_entry_point_is_the_public_module() -> None:
    (entry,) = [
        e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "idemhook"
    ]
    assert entry.value == "idemhook.testing.pytest_plugin"
    assert callable(idemhook.testing.pytest_plugin.idemhook)


def test_the_test_kit_imports_without_pytest() -> None:
    # A plugin's own tooling may use deliver()/signed() where pytest is not installed.
    code = (
        "import sys; sys.modules['pytest'] = None; "
        "from idemhook.testing import deliver, signed, Kit, ANY; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_examples_docs_and_test_plugins_import_only_the_public_api() -> None:
    offenders = []
    for path in sorted((ROOT / "examples").rglob("*.py")):
        if PRIVATE_IMPORT.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python[^\n]*\n(.*?)```", path.read_text(), re.S):
            if PRIVATE_IMPORT.search(block):
                offenders.append(str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "tests" / "plugins").rglob("*.py")):
        if PRIVATE_IMPORT.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_readme_never_sends_a_newcomer_into_app_or_scripts() -> None:
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"(?<![\w/.-])(app|scripts)/", readme)
    for link in re.findall(r"\]\(([^)#]+)", readme):
        assert (ROOT / link).exists(), link
