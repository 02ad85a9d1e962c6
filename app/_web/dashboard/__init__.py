"""The operator's dashboard: ``GET /dashboard`` and its pages, served by the receiver itself.

Server-rendered Jinja templates and one CSS file; no script. Off (404) unless
``IDEMHOOK_ADMIN_TOKEN`` is set; a login with that token opens a signed session
(:mod:`.access`). The pages are :mod:`.views`; their figures stay fast on big
tables (:mod:`.overview`, :mod:`.counts`). See docs/dashboard.md.
"""

from __future__ import annotations

from flask import Flask

from idemhook._values.errors import ConfigError
from idemhook._web.dashboard.access import DashboardSessions
from idemhook._web.dashboard.views import bp


def init_app(app: Flask) -> None:
    secret = app.config.get("IDEMHOOK_SECRET_KEY")
    if secret and len(str(secret)) < 32:
        raise ConfigError("IDEMHOOK_SECRET_KEY must be at least 32 characters long")
    app.session_interface = DashboardSessions()
    app.register_blueprint(bp)
