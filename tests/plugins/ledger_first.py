"""Only the ledger plugin's ``first`` handler (so that its Ignore decides the event)."""

from tests.plugins.ledger import IDEMHOOK_MIGRATIONS, first

__all__ = ["IDEMHOOK_MIGRATIONS", "first"]
