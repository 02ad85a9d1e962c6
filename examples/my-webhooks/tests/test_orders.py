"""The handlers through idemhook's test kit (the `idemhook` fixture comes with idemhook)."""

from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[1] / "webhooks.toml"


@pytest.fixture
def shop(idemhook, monkeypatch):
    monkeypatch.setenv("SHOP_WEBHOOK_SECRET", "a-test-secret-of-some-length")
    return idemhook(CONFIG)


def test_a_paid_order_is_recorded_once(shop):
    event = {"id": "evt_1", "type": "order.paid", "order": {"id": 42, "total_cents": 1999}}
    assert shop.deliver("shop", event).json["status"] == "processed"
    assert shop.deliver("shop", event).json["status"] == "duplicate"
    shop.assert_processed("shop", "evt_1", result={"order": 42}, duplicates=1)
    assert shop.sql("SELECT order_id, total_cents FROM paid_orders") == [(42, 1999)]


def test_a_free_order_is_ignored(shop):
    event = {"id": "evt_2", "type": "order.paid", "order": {"id": 43, "total_cents": 0}}
    assert shop.deliver("shop", event).status_code == 200
    shop.assert_ignored("shop", "evt_2", reason="free order: nothing to record")
