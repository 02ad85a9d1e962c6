"""Verification schemes, one module each; importing this package registers them all."""

from idemhook._config.schemes import (  # noqa: F401 (imported to register)
    attio,
    close,
    github,
    hmac_sha256,
    hubspot,
    idempotency_key,
    none,
    pipedrive,
    salesforce_outbound,
    shopify,
    standard_webhooks,
    stripe,
)
from idemhook._config.schemes.base import SCHEMES, Delivery, Reply, Scheme, register

__all__ = ["SCHEMES", "Delivery", "Reply", "Scheme", "register"]
