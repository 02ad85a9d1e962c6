"""The example CRM plugin, as served by `make run` (webhooks.example.toml), through the test kit."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "webhooks.example.toml"
CONTACT = 123


@pytest.fixture
def hubspot(idemhook, monkeypatch):
    """The demo receiver with the CRM plugin, on a fresh database with its contacts table."""
    monkeypatch.setenv("DEMO_WEBHOOK_SECRET", "demo-test-secret")
    monkeypatch.setenv("HUBSPOT_CLIENT_SECRET", "hubspot-test-secret")
    monkeypatch.setenv("EMAIL_API_TOKEN", "email-test-token-0123456789")
    return idemhook(EXAMPLE_CONFIG)


def event(event_id, subscription, occurred_at, **fields):
    return {
        "eventId": event_id,
        "subscriptionId": 7,
        "portalId": 62515,
        "appId": 1,
        "occurredAt": occurred_at,
        "subscriptionType": subscription,
        "attemptNumber": 0,
        "objectId": CONTACT,
        **fields,
    }


def change(event_id, occurred_at, name, value):
    return event(
        event_id, "contact.propertyChange", occurred_at, propertyName=name, propertyValue=value
    )


def contact(kit):
    rows = kit.sql("SELECT * FROM contacts WHERE contact_id = :c", c=CONTACT)
    return rows[0] if rows else None


def key(event_id, occurred_at):
    """The hubspot scheme's composite dedupe key: portalId:subscriptionId:eventId:occurredAt."""
    return f"62515:7:{event_id}:{occurred_at}"


def statuses(response):
    """(eventId, status) per event; checks each stored key is the composite one."""
    assert response.status_code == 200, response.json
    found = []
    for e in response.json["events"]:
        portal, subscription, event_id, _ = e["event_id"].split(":")
        assert (portal, subscription) == ("62515", "7")
        found.append((event_id, e["status"]))
    return found


def test_create_then_change_then_delete(hubspot):
    created = hubspot.deliver("hubspot", [event(1, "contact.creation", 1_000)])
    assert statuses(created) == [("1", "processed")]
    hubspot.assert_processed("hubspot", key(1, 1_000), result={"contact": CONTACT, "created": True})
    row = contact(hubspot)
    assert row.properties == {} and row.created_at.timestamp() == 1.0

    changed = hubspot.deliver(
        "hubspot",
        [change(2, 2_000, "email", "ada@example.com"), change(3, 2_000, "firstname", "Ada")],
    )
    assert statuses(changed) == [("2", "processed"), ("3", "processed")]
    assert contact(hubspot).properties == {"email": "ada@example.com", "firstname": "Ada"}

    deleted = hubspot.deliver("hubspot", [event(4, "contact.deletion", 3_000)])
    assert statuses(deleted) == [("4", "processed")]
    row = contact(hubspot)
    assert row.properties == {} and row.deleted_at.timestamp() == 3.0


def test_duplicate_of_each_event_is_not_applied_again(hubspot):
    batch = [
        event(1, "contact.creation", 1_000),
        change(2, 2_000, "email", "ada@example.com"),
    ]
    assert statuses(hubspot.deliver("hubspot", batch)) == [("1", "processed"), ("2", "processed")]
    # Someone edits the contact meanwhile; a redelivered old change must not undo it.
    assert statuses(hubspot.deliver("hubspot", [change(5, 4_000, "email", "new@example.com")])) == [
        ("5", "processed")
    ]
    assert statuses(hubspot.deliver("hubspot", batch)) == [("1", "duplicate"), ("2", "duplicate")]
    assert contact(hubspot).properties == {"email": "new@example.com"}
    hubspot.assert_processed("hubspot", key(2, 2_000), duplicates=1)

    deletion = [event(6, "contact.deletion", 5_000)]
    assert statuses(hubspot.deliver("hubspot", deletion)) == [("6", "processed")]
    assert statuses(hubspot.deliver("hubspot", deletion)) == [("6", "duplicate")]
    hubspot.assert_processed("hubspot", key(6, 5_000), result={"contact": CONTACT, "deleted": True})


def test_out_of_order_change_is_acknowledged_and_skipped(hubspot):
    newer = change(2, 2_000, "email", "new@example.com")
    older = change(1, 1_000, "email", "old@example.com")
    assert statuses(hubspot.deliver("hubspot", [newer])) == [("2", "processed")]
    response = hubspot.deliver("hubspot", [older])
    assert statuses(response) == [("1", "ignored")]
    assert response.json["events"][0]["result"] == {
        "ignored": "out of order: email was already set by a change at 2000"
    }
    hubspot.assert_ignored(
        "hubspot", key(1, 1_000), reason="out of order: email was already set by a change at 2000"
    )
    assert contact(hubspot).properties == {"email": "new@example.com"}
    # The guard is per property: an older change to another property still applies.
    assert statuses(hubspot.deliver("hubspot", [change(3, 500, "phone", "+1 555")])) == [
        ("3", "processed")
    ]
    assert contact(hubspot).properties == {"email": "new@example.com", "phone": "+1 555"}


def test_change_arriving_before_creation_and_after_deletion(hubspot):
    # The change is delivered before the creation: the contact row is created by the change.
    assert statuses(hubspot.deliver("hubspot", [change(2, 2_000, "email", "a@example.com")])) == [
        ("2", "processed")
    ]
    assert statuses(hubspot.deliver("hubspot", [event(1, "contact.creation", 1_000)])) == [
        ("1", "processed")
    ]
    assert contact(hubspot).properties == {"email": "a@example.com"}
    hubspot.deliver("hubspot", [event(3, "contact.deletion", 3_000)])
    late = hubspot.deliver("hubspot", [change(4, 2_500, "email", "b@example.com")])
    assert statuses(late) == [("4", "ignored")]
    hubspot.assert_ignored("hubspot", key(4, 2_500), reason=f"contact {CONTACT} is deleted")
    assert contact(hubspot).properties == {}


def test_malformed_contact_event_is_rejected_for_good(hubspot):
    bad = change(9, 1_000, "email", "x@example.com")
    del bad["objectId"]
    response = hubspot.deliver("hubspot", [bad, event(10, "contact.creation", 1_000)])
    assert statuses(response) == [("9", "rejected"), ("10", "processed")]
    hubspot.assert_rejected(
        "hubspot", key(9, 1_000), reason="objectId, portalId and occurredAt must be whole numbers"
    )
    assert statuses(hubspot.deliver("hubspot", [bad])) == [("9", "duplicate")]
