"""Test kit for idemhook and its plugin authors (see docs/plugins.md).

``deliver``/``signed`` sign a request as a source's scheme requires; :class:`Kit`
wraps a receiver under test with row assertions; the pytest plugin
(``idemhook.testing.pytest_plugin``, enabled on install) provides the ``idemhook`` fixture.
"""

from idemhook.testing.kit import deliver, signed
from idemhook.testing.receiver import ANY, Kit

__all__ = ["ANY", "Kit", "deliver", "signed"]
