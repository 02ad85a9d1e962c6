"""Every signing scheme: valid, tampered, wrong secret, rotated secret, missing header, freshness.

Table-driven over the schemes at the unit level (no HTTP, no database); the
end-to-end tests drive the same schemes through the receiver.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from werkzeug.datastructures import Headers

from idemhook._config.schemes import SCHEMES, Delivery, Scheme
from idemhook._config.schemes.base import check_freshness
from idemhook._values.errors import ConfigError, Unauthorized

URL = "https://hooks.example.com/webhooks/src"
BODY = b'{"id": "evt_1", "type": "contact.created", "n": 1}'


def plain(i: int) -> str:
    return f"secret-number-{i}"


@dataclass(frozen=True)
class Case:
    scheme: str
    secret: Any = plain  # i -> a valid secret for this scheme
    options: dict[str, Any] = field(default_factory=dict)
    signature_headers: tuple[str, ...] = ()  # removed for the "missing header" case
    missing_code: str = "missing_signature"
    body_bound: bool = True  # False: credentials, not a signature over the body
    timestamped: bool = False
    wrong_code: str = "invalid_signature"

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.options.items() if k != "username")
        return self.scheme + (f"[{extra}]" if extra else "")


CASES = [
    Case("stripe", lambda i: f"whsec_stripe{i}", signature_headers=("Stripe-Signature",),
         timestamped=True),
    Case("standard-webhooks", lambda i: "whsec_" + base64.b64encode(bytes([i]) * 24).decode(),
         signature_headers=("webhook-signature",), timestamped=True),
    Case("svix", lambda i: "whsec_" + base64.b64encode(bytes([i]) * 24).decode(),
         signature_headers=("svix-signature",), timestamped=True),
    Case("github", signature_headers=("X-Hub-Signature-256",)),
    Case("shopify", signature_headers=("X-Shopify-Hmac-Sha256",)),
    Case("hubspot", signature_headers=("X-HubSpot-Signature-v3",), timestamped=True),
    Case("hubspot", options={"signature_version": "v2"},
         signature_headers=("X-HubSpot-Signature",)),
    Case("hubspot", options={"signature_version": "v1"},
         signature_headers=("X-HubSpot-Signature",)),
    Case("close", lambda i: (bytes([i + 1]) * 16).hex(), signature_headers=("close-sig-hash",),
         timestamped=True),
    Case("attio", signature_headers=("Attio-Signature",)),
    Case("pipedrive", options={"username": "hooks"}, signature_headers=("Authorization",),
         missing_code="missing_credentials", body_bound=False, wrong_code="invalid_credentials"),
    Case("idempotency-key", signature_headers=("X-Signature",)),
    Case("idempotency-key", options={"auth": "bearer"}, signature_headers=("Authorization",),
         missing_code="missing_credentials", body_bound=False, wrong_code="invalid_credentials"),
    Case("hmac-sha256", signature_headers=("X-Signature",)),
]  # fmt: skip


def build(case: Case, *secret_numbers: int, **options: Any) -> Scheme:
    secrets = [case.secret(i) for i in secret_numbers]
    config = {**case.options, **options, "secret": secrets}
    return SCHEMES[case.scheme]("src", config)


def signed(scheme: Scheme, body: bytes = BODY, at: float | None = None) -> Headers:
    headers = Headers({"Content-Type": "application/json", "Idempotency-Key": "key-1"})
    if at is None:
        headers.update(scheme.sign(Delivery(body, headers, "POST", URL)))
        return headers
    real = time.time
    try:
        time.time = lambda: at  # type: ignore[assignment]
        headers.update(scheme.sign(Delivery(body, headers, "POST", URL)))
    finally:
        time.time = real  # type: ignore[assignment]
    return headers


def verify(scheme: Scheme, headers: Headers, body: bytes = BODY) -> None:
    scheme.verify(Delivery(body, headers, "POST", URL))


def rejects(scheme: Scheme, headers: Headers, body: bytes = BODY) -> str:
    with pytest.raises(Unauthorized) as info:
        verify(scheme, headers, body)
    assert info.value.status_code == 401
    return info.value.code


@pytest.mark.parametrize("case", CASES, ids=str)
def test_valid_request_verifies(case: Case) -> None:
    scheme = build(case, 1)
    verify(scheme, signed(scheme))


@pytest.mark.parametrize("case", [c for c in CASES if c.body_bound], ids=str)
def test_tampered_body_is_rejected(case: Case) -> None:
    scheme = build(case, 1)
    headers = signed(scheme)
    assert rejects(scheme, headers, BODY.replace(b'"n": 1', b'"n": 2')) == "invalid_signature"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_wrong_secret_is_rejected(case: Case) -> None:
    headers = signed(build(case, 9))
    assert rejects(build(case, 1, 2), headers) == case.wrong_code


@pytest.mark.parametrize("case", CASES, ids=str)
def test_second_rotated_secret_verifies(case: Case) -> None:
    receiver = build(case, 1, 2)
    verify(receiver, signed(build(case, 2)))
    verify(receiver, signed(build(case, 1)))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_missing_signature_header_is_rejected(case: Case) -> None:
    scheme = build(case, 1)
    headers = signed(scheme)
    for name in case.signature_headers:
        del headers[name]
    assert rejects(scheme, headers) == case.missing_code


@pytest.mark.parametrize("case", [c for c in CASES if c.timestamped], ids=str)
@pytest.mark.parametrize("offset", [-301, 301], ids=["stale", "future"])
def test_timestamp_outside_tolerance_is_rejected(case: Case, offset: int) -> None:
    scheme = build(case, 1)
    headers = signed(scheme, at=time.time() + offset)
    assert rejects(scheme, headers) == "stale_timestamp"


@pytest.mark.parametrize("case", [c for c in CASES if c.timestamped], ids=str)
def test_tolerance_is_configurable_per_source(case: Case) -> None:
    headers = signed(build(case, 1), at=time.time() - 600)
    verify(build(case, 1, tolerance_seconds=900), headers)
    assert rejects(build(case, 1, tolerance_seconds=60), headers) == "stale_timestamp"


@pytest.mark.parametrize("case", [c for c in CASES if c.timestamped], ids=str)
def test_stale_and_forged_reports_the_signature_not_the_clock(case: Case) -> None:
    headers = signed(build(case, 9), at=time.time() - 3600)
    assert rejects(build(case, 1), headers) == "invalid_signature"


@pytest.mark.parametrize(
    ("scheme", "config", "key"),
    [
        ("stripe", {"secret": "x", "tolerance_seconds": 0}, "tolerance_seconds"),
        ("standard-webhooks", {"secret": "whsec_not base64!"}, "secret"),
        ("close", {"secret": "not-hex"}, "secret"),
        ("hubspot", {"secret": "x", "signature_version": "v4"}, "signature_version"),
        ("pipedrive", {"secret": "x"}, "username"),
        ("idempotency-key", {"secret": "x", "auth": "basic"}, "auth"),
        ("salesforce-outbound", {}, "organization_id"),
        ("salesforce-outbound", {"organization_id": "00D-not-an-id"}, "organization_id"),
    ],
)
def test_bad_scheme_option_stops_startup_naming_the_key(scheme, config, key) -> None:
    with pytest.raises(ConfigError, match=rf"\[sources\.src\] {key}"):
        SCHEMES[scheme]("src", config)


@pytest.mark.parametrize("timestamp", ["9" * 400, "-" + "9" * 400, "1e9", " 12 34", ""])
def test_absurd_signed_timestamps_are_refused_not_crashed(timestamp: str) -> None:
    with pytest.raises(Unauthorized) as info:
        check_freshness(timestamp, tolerance=300, header="X-T", unit=1000)
    assert info.value.code in ("stale_timestamp", "invalid_signature")
