"""pytest fixtures for handler authors: ``idemhook``, ``idemhook_pg_server``, and the templates.

Registered through the ``pytest11`` entry point when idemhook is installed, so a
test only names the fixture. What each one gives is in docs/plugins.md.
"""

from idemhook.testing.pytest_plugin import idemhook as idemhook
from idemhook.testing.pytest_plugin import idemhook_pg_server as idemhook_pg_server
from idemhook.testing.pytest_plugin import idemhook_templates as idemhook_templates
