"""Test kit for idemhook and its plugin authors (see docs/plugins.md)."""

from .kit import deliver, signed

__all__ = ["deliver", "signed"]
