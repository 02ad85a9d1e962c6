"""Verification schemes, one module each; importing this package registers them all."""

from . import hmac_sha256, none  # noqa: F401  (imported to register)
from .base import SCHEMES, Delivery, Scheme, register

__all__ = ["SCHEMES", "Delivery", "Scheme", "register"]
