"""Example plugin: keep a ``contacts`` table in sync with HubSpot contact webhooks.

``handlers.py`` holds the handlers, ``migrations/`` the table's own Alembic
revision, ``events/`` sample deliveries for ``idemhook send``. Explained in
docs/plugins.md ("The example plugin").
"""
