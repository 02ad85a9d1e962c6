"""The known vectors (../shared/providers.md) and cross-checks with the providers' own SDKs."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import standardwebhooks
import stripe
from hubspot.utils.signature import Signature as HubSpotSignature
from werkzeug.datastructures import Headers

from idemhook._config.schemes import SCHEMES, Delivery
from idemhook._values.errors import Unauthorized

HUBSPOT_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
HUBSPOT_BODY = b"{'example_field':'example_value'}"
HUBSPOT_URI = "https://www.example.com/webhook_uri"
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_BODY = b'{"test": 2432232314}'
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TIMESTAMP = 1614265330
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
SW_JUNK = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="


def scheme(name: str, **config):
    return SCHEMES[name]("src", config)


def verify(s, body: bytes, headers: dict[str, str], url: str = HUBSPOT_URI) -> None:
    s.verify(Delivery(body, Headers(headers), "POST", url))


def code_of(s, body: bytes, headers: dict[str, str], url: str = HUBSPOT_URI) -> str:
    with pytest.raises(Unauthorized) as info:
        verify(s, body, headers, url)
    return info.value.code


@pytest.fixture
def frozen(monkeypatch):
    """Set the clock: ``frozen(unix_seconds)``."""

    def freeze(at: float) -> None:
        monkeypatch.setattr(time, "time", lambda: at)

    return freeze


# --- vector 1: GitHub's documented example ---


def test_github_documented_vector() -> None:
    gh = scheme("github", secret="It's a Secret to Everybody")
    signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    verify(gh, b"Hello, World!", {"X-Hub-Signature-256": signature})
    assert gh.sign(Delivery(b"Hello, World!"))["X-Hub-Signature-256"] == signature
    assert code_of(gh, b"Hello, World?", {"X-Hub-Signature-256": signature}) == (
        "invalid_signature"
    )


# --- vector 2: HubSpot's SDK test values ---


def test_hubspot_v1_vector() -> None:
    hs = scheme("hubspot", secret=HUBSPOT_SECRET, signature_version="v1")
    expected = "69fc6631a867edd4f9e9e627fc5c1148e3fbdd8b21837b6d2b8901c1fa57f750"
    verify(hs, HUBSPOT_BODY, {"X-HubSpot-Signature": expected})


def test_hubspot_v2_vector() -> None:
    hs = scheme("hubspot", secret=HUBSPOT_SECRET, signature_version="v2")
    expected = "4fe4e3a7d3cf09db53be39d0a58130e2aaba074ec123a9e355b876a689a1c383"
    verify(hs, HUBSPOT_BODY, {"X-HubSpot-Signature": expected})
    # v2 signs the URI: the same signature for another address fails.
    assert code_of(hs, HUBSPOT_BODY, {"X-HubSpot-Signature": expected}, HUBSPOT_URI + "2") == (
        "invalid_signature"
    )


def test_hubspot_v3_vector_matches_and_is_then_refused_as_stale(frozen) -> None:
    hs = scheme("hubspot", secret=HUBSPOT_SECRET)
    headers = {
        "X-HubSpot-Signature-v3": "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y=",
        "X-HubSpot-Request-Timestamp": "1693657560000",
    }
    # Today the 2023 timestamp is stale, which is reported only after the signature matched.
    assert code_of(hs, HUBSPOT_BODY, headers) == "stale_timestamp"
    frozen(1693657560 + 10)
    verify(hs, HUBSPOT_BODY, headers)
    tampered = {**headers, "X-HubSpot-Request-Timestamp": "1693657561000"}
    assert code_of(hs, HUBSPOT_BODY, tampered) == "invalid_signature"


# --- vector 3: the Standard Webhooks library's test values ---


def test_standard_webhooks_vector_among_junk_entries(frozen) -> None:
    sw = scheme("standard-webhooks", secret=SW_SECRET)
    headers = {
        "webhook-id": SW_ID,
        "webhook-timestamp": str(SW_TIMESTAMP),
        "webhook-signature": f"{SW_JUNK} v2,junk {SW_SIGNATURE}",
    }
    assert code_of(sw, SW_BODY, headers) == "stale_timestamp"
    frozen(SW_TIMESTAMP + 5)
    verify(sw, SW_BODY, headers)
    svix = scheme("svix", secret=SW_SECRET)
    verify(svix, SW_BODY, {k.replace("webhook-", "svix-"): v for k, v in headers.items()})
    junk_only = {**headers, "webhook-signature": SW_JUNK}
    assert code_of(sw, SW_BODY, junk_only) == "invalid_signature"


# --- vector 4: Stripe's cases ---


def test_stripe_extra_bad_v1_beside_a_good_one_passes() -> None:
    st = scheme("stripe", secret="whsec_abc")
    good = st.sign(Delivery(b"{}"))["Stripe-Signature"]
    t, v1 = good.split(",")
    verify(st, b"{}", {"Stripe-Signature": f"{t},v1=bad,{v1},v0=whatever,x9=future"})


def test_stripe_v0_only_fails() -> None:
    st = scheme("stripe", secret="whsec_abc")
    good = st.sign(Delivery(b"{}"))["Stripe-Signature"]
    t, v1 = good.split(",")
    assert code_of(st, b"{}", {"Stripe-Signature": f"{t},v0={v1[3:]}"}) == "invalid_signature"


def test_stripe_old_t_fails() -> None:
    st = scheme("stripe", secret="whsec_abc")
    header = stripe.WebhookSignature.generate_signature_header(
        "{}", "whsec_abc", timestamp=int(time.time()) - 400
    )
    assert code_of(st, b"{}", {"Stripe-Signature": header}) == "stale_timestamp"


# --- cross-checks with the official packages ---


def test_requests_signed_by_standardwebhooks_library_are_accepted() -> None:
    lib = standardwebhooks.Webhook(SW_SECRET)
    now = datetime.now(UTC)
    body = '{"type": "invoice.paid", "id": 7}'
    signature = lib.sign("msg_cross_check", now, body)
    headers = {
        "webhook-id": "msg_cross_check",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    verify(scheme("standard-webhooks", secret=SW_SECRET), body.encode(), headers)
    # And the other way: the library accepts what we sign.
    ours = scheme("standard-webhooks", secret=SW_SECRET).sign(Delivery(body.encode()))
    assert lib.verify(body, ours) == {"type": "invoice.paid", "id": 7}


def test_requests_signed_by_stripe_library_are_accepted() -> None:
    body = '{"id": "evt_1", "type": "charge.succeeded"}'
    header = stripe.WebhookSignature.generate_signature_header(body, "whsec_cross")
    verify(scheme("stripe", secret="whsec_cross"), body.encode(), {"Stripe-Signature": header})
    ours = scheme("stripe", secret="whsec_cross").sign(Delivery(body.encode()))
    assert stripe.WebhookSignature.verify_header(
        body, ours["Stripe-Signature"], "whsec_cross", tolerance=300
    )


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_hubspot_signing_agrees_with_hubspot_api_client(version: str) -> None:
    hs = scheme("hubspot", secret=HUBSPOT_SECRET, signature_version=version)
    body = b'[{"eventId": 1, "subscriptionType": "contact.creation"}]'
    url = "https://hooks.example.com/webhooks/hubspot?portal=62515"
    ours = hs.sign(Delivery(body, method="POST", url=url))
    header = "X-HubSpot-Signature-v3" if version == "v3" else "X-HubSpot-Signature"
    assert HubSpotSignature.is_valid(
        signature=ours[header],
        client_secret=HUBSPOT_SECRET,
        request_body=body.decode(),
        http_uri=url,
        http_method="POST",
        signature_version=version,
        timestamp=ours.get("X-HubSpot-Request-Timestamp"),
    )
    theirs = HubSpotSignature.get_signature(
        HUBSPOT_SECRET, body.decode(), version, url, "POST", ours.get("X-HubSpot-Request-Timestamp")
    )
    verify(hs, body, {**ours, header: theirs}, url)
