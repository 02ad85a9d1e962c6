"""Both Standard Webhooks schemes accept either header family, for the signature and the ID.

docs/providers.md: ``standard-webhooks`` and ``svix`` take ``webhook-*`` or ``svix-*``
headers. A request signed with one family must be verified and claimed under the ID
from that same family, whichever scheme name the source uses.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import standardwebhooks

from .conftest import SECRETS


def signed_headers(family: str, msg_id: str, body: str) -> dict[str, str]:
    """Headers of ``family`` as the official Standard Webhooks library signs them."""
    now = datetime.now(UTC)
    signature = standardwebhooks.Webhook(SECRETS["standard"]).sign(msg_id, now, body)
    return {
        "Content-Type": "application/json",
        f"{family}-id": msg_id,
        f"{family}-timestamp": str(int(now.timestamp())),
        f"{family}-signature": signature,
    }


@pytest.mark.parametrize("source", ["standard", "svix"])
@pytest.mark.parametrize("family", ["webhook", "svix"])
def test_either_family_is_verified_and_claimed_under_its_id(pclient, sql, source, family):
    msg_id = f"msg_{source}_{family}"
    body = json.dumps({"type": "invoice.paid", "n": 1})
    answer = pclient.post(
        f"/webhooks/{source}", data=body, headers=signed_headers(family, msg_id, body)
    )
    assert answer.status_code == 200, answer.json
    assert answer.json == {
        "event_id": msg_id,
        "status": "processed",
        "result": answer.json["result"],
    }
    [row] = sql("SELECT event_id, event_type FROM processed_events WHERE source = :s", s=source)
    assert tuple(row) == (msg_id, "invoice.paid")


def test_a_request_with_both_families_uses_the_schemes_own_first(pclient, sql):
    body = json.dumps({"type": "invoice.paid"})
    mixed = {
        **signed_headers("svix", "msg_svix", body),
        **signed_headers("webhook", "msg_wh", body),
    }
    assert pclient.post("/webhooks/standard", data=body, headers=mixed).json["event_id"] == "msg_wh"
    assert pclient.post("/webhooks/svix", data=body, headers=mixed).json["event_id"] == "msg_svix"


def test_missing_id_in_either_family_is_an_unsigned_request(pclient):
    body = json.dumps({"type": "invoice.paid"})
    headers = signed_headers("svix", "msg_x", body)
    del headers["svix-id"]
    answer = pclient.post("/webhooks/standard", data=body, headers=headers)
    assert answer.status_code == 401 and answer.json["error"] == "missing_signature"
