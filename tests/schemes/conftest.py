"""A receiver with one source per provider scheme, handled by tests.plugins.providers."""

from __future__ import annotations

import pytest
from flask import Flask

ORG = "00D000000000001EAA"
SECRETS = {
    "stripe": "whsec_test_stripe_secret",
    "standard": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "github": "It's a Secret to Everybody",
    "shopify": "shpss_test_secret",
    "hubspot": "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy",
    "close": "0123456789abcdef0123456789abcdef",
    "attio": "attio-test-secret",
    "pipedrive": "pipedrive-password",
    "firstparty": "first-party-secret",
}

PROVIDER_SOURCES = {
    "plugins": ["tests.plugins.providers"],
    "sources": {
        "stripe": {"scheme": "stripe", "secret": SECRETS["stripe"]},
        "standard": {"scheme": "standard-webhooks", "secret": SECRETS["standard"]},
        "svix": {"scheme": "svix", "secret": SECRETS["standard"]},
        "github": {"scheme": "github", "secret": SECRETS["github"]},
        "shopify": {"scheme": "shopify", "secret": SECRETS["shopify"]},
        "hubspot": {"scheme": "hubspot", "secret": SECRETS["hubspot"]},
        "close": {"scheme": "close", "secret": SECRETS["close"]},
        "attio": {"scheme": "attio", "secret": SECRETS["attio"]},
        "pipedrive": {
            "scheme": "pipedrive",
            "username": "idemhook",
            "secret": SECRETS["pipedrive"],
        },
        "salesforce": {"scheme": "salesforce-outbound", "organization_id": ORG},
        "firstparty": {"scheme": "idempotency-key", "secret": SECRETS["firstparty"]},
        "hashed": {
            "scheme": "hmac-sha256",
            "secret": SECRETS["firstparty"],
            "event_id": "sha256:body",
        },
    },
}


@pytest.fixture
def providers_app(make_app) -> Flask:
    """The receiver with a source for every provider scheme."""
    return make_app(PROVIDER_SOURCES)


@pytest.fixture
def pclient(providers_app: Flask):
    """A test client of ``providers_app``."""
    return providers_app.test_client()
