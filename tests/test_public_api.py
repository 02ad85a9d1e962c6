"""``idemhook`` is the public API: plugin authors, the docs and the examples use only it."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import app.operations
import app.outbox
import app.plugins
import app.testing
import idemhook
import idemhook.testing
import idemhook.testing.pytest_plugin

ROOT = Path(__file__).resolve().parent.parent
#: ``from app...``/``import app...`` in Python, or ``app.x`` named in prose as something to use.
APP_IMPORT = re.compile(r"^\s*(from app(\.| import)|import app\b)", re.M)


def test_handler_api_is_the_services_own() -> None:
    assert idemhook.handler is app.plugins.handler
    assert idemhook.Ignore is app.plugins.Ignore
    assert idemhook.Reject is app.plugins.Reject
    assert idemhook.Event is app.plugins.Event
    assert idemhook.sender is app.plugins.sender
    assert idemhook.Message is app.outbox.Message
    assert idemhook.Response is app.plugins.Response
    assert idemhook.api_view is app.operations.api_view
    assert idemhook.testing.Kit is app.testing.Kit
    assert idemhook.testing.deliver is app.testing.deliver
    assert idemhook.testing.signed is app.testing.signed
    assert idemhook.testing.ANY is app.testing.ANY


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


def test_examples_and_docs_never_import_the_service_package() -> None:
    offenders = []
    for path in sorted((ROOT / "examples").rglob("*.py")):
        if APP_IMPORT.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python[^\n]*\n(.*?)```", path.read_text(), re.S):
            if APP_IMPORT.search(block):
                offenders.append(str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "tests" / "plugins").rglob("*.py")):
        if APP_IMPORT.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_readme_never_sends_a_newcomer_into_app_or_scripts() -> None:
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"(?<![\w/.-])(app|scripts)/", readme)
    for link in re.findall(r"\]\(([^)#]+)", readme):
        assert (ROOT / link).exists(), link
