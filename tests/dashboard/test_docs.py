"""docs/dashboard.md lists every dashboard route; its settings and codes are documented."""

from __future__ import annotations

import re
from pathlib import Path

from idemhook._config.settings import DEFAULTS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _shape(path: str) -> str:
    return re.sub(r"<[^>]+>", "<>", path)


def test_every_dashboard_route_is_in_the_routes_table(app):
    routed = {
        (method, _shape(rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("dashboard.")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    table = (DOCS / "dashboard.md").read_text().split("## Routes", 1)[1]
    documented = {
        (method, _shape(path))
        for methods, path in re.findall(r"^\| `([A-Z, ]+) (/dashboard[^`]*)`", table, re.M)
        for method in methods.split(", ")
    }
    assert routed == documented


def test_settings_and_error_codes_are_documented():
    configuration = (DOCS / "configuration.md").read_text()
    for key in ("IDEMHOOK_SECRET_KEY", "IDEMHOOK_ADMIN_TOKEN"):
        assert key in DEFAULTS and f"| `{key}` |" in configuration
    http = (DOCS / "http.md").read_text()
    for code in ("login_required", "csrf_failed", "forbidden"):
        assert re.search(rf"`(\d+ )?{code}`", http), code
