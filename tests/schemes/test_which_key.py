"""Every signing scheme says which key verified a request, and verifies with a tenant's keys.

``verify`` returns the position of the matching key (a rotation list's 1st, 2nd, ...);
given ``keys`` (a tenant's live secrets) it verifies against those only, never the
source's own.
"""

from __future__ import annotations

import pytest

from idemhook._config.schemes import SCHEMES, Delivery
from idemhook._values.errors import Unauthorized
from tests.schemes.test_verify import BODY, CASES, URL, build, signed

TENANT_CASES = [c for c in CASES if SCHEMES[c.scheme].serves_tenants]


def test_schemes_without_a_secret_per_request_serve_no_tenants():
    assert {c.scheme for c in CASES} - {c.scheme for c in TENANT_CASES} == {"idempotency-key"}
    assert not SCHEMES["none"].serves_tenants
    assert not SCHEMES["salesforce-outbound"].serves_tenants


@pytest.mark.parametrize("case", TENANT_CASES, ids=str)
def test_verify_returns_the_position_of_the_matching_secret(case):
    rotating = build(case, 1, 2, 3)
    for position, number in enumerate((1, 2, 3)):
        headers = signed(build(case, number))
        assert rotating.verify(Delivery(BODY, headers, "POST", URL)) == position


@pytest.mark.parametrize("case", TENANT_CASES, ids=str)
def test_a_tenants_keys_replace_the_sources_own(case):
    own = build(case, 1)
    tenant_keys = [own.tenant_key(case.secret(n)) for n in (7, 8)]
    by_tenant = signed(own.with_keys(tenant_keys[1:]))
    # The tenant's second key verified it: position 1 of the tenant's keys.
    assert own.verify(Delivery(BODY, by_tenant, "POST", URL), tenant_keys) == 1
    # The source's own secret does not verify a tenant's request, nor the reverse.
    with pytest.raises(Unauthorized):
        own.verify(Delivery(BODY, signed(own), "POST", URL), tenant_keys)
    with pytest.raises(Unauthorized):
        own.verify(Delivery(BODY, by_tenant, "POST", URL))
