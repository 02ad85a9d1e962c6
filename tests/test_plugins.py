"""The handler API end to end: routing, several handlers in one transaction, outcomes."""

from __future__ import annotations

import pytest

from idemhook import Response
from idemhook._engine.registry import Registry, handler

SECRET = "plugin-test-secret"

LEDGER = {
    "plugins": ["tests.plugins.ledger"],
    "sources": {
        "shop": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "event_type": "body:type",
        },
        "shop-batch": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
            "event_type": "body:type",
            "batch": "array",
        },
        "other": {"scheme": "none", "allow_unverified": True, "event_id": "body:id"},
    },
}


def ledger(kit, event_id):
    return [
        r.handler
        for r in kit.sql(
            "SELECT handler FROM ledger WHERE event_id = :e ORDER BY handler", e=event_id
        )
    ]


def _noop(event, db):
    return None


def test_routing_exact_prefix_star_and_any_source():
    registry = Registry()
    registry.add("shop", "order.paid", _noop)
    registry.add("shop", "order.*", _noop)
    registry.add("shop", "*", _noop)
    registry.add("*", "refund.*", _noop)

    def patterns(source, event_type):
        return [(r.source, r.pattern) for r in registry.for_event(source, event_type)]

    assert patterns("shop", "order.paid") == [
        ("shop", "order.paid"),
        ("shop", "order.*"),
        ("shop", "*"),
    ]
    assert patterns("shop", "order.refunded") == [("shop", "order.*"), ("shop", "*")]
    # "order.*" needs the dot: "orders" is another type.
    assert patterns("shop", "orders") == [("shop", "*")]
    assert patterns("crm", "refund.created") == [("*", "refund.*")]
    assert patterns("crm", "order.paid") == []
    assert patterns("shop", None) == [("shop", "*")]  # a source without event_type


def test_a_response_may_choose_a_json_content_type_and_nothing_else():
    problem = Response(400, {"error": "x"}, {"content-type": "Application/Problem+JSON"})
    assert problem.headers == (("Content-Type", "application/problem+json"),)
    assert Response(200, [], [("Content-Type", "application/json")]).headers == (
        ("Content-Type", "application/json"),
    )
    for value in ("text/html", "application/json; charset=utf-8", "application/jsonx"):
        with pytest.raises(ValueError, match="not a JSON media type"):
            Response(200, {}, {"Content-Type": value})
    with pytest.raises(ValueError, match="'Set-Cookie' is not allowed"):
        Response(200, {}, {"Set-Cookie": "a=b"})


def test_star_may_only_end_a_pattern():
    with pytest.raises(ValueError, match="may only end"):
        handler("shop", "order.*.paid")


def test_several_handlers_share_the_transaction_and_the_result(idemhook):
    kit = idemhook(LEDGER)
    response = kit.deliver("shop", {"id": "o1", "type": "order.paid"})
    assert response.status_code == 200
    assert response.json["status"] == "processed"
    assert response.json["result"] == {
        "tests.plugins.ledger:first": {"first": "o1"},
        "tests.plugins.ledger:second": {"second": "o1"},
        "tests.plugins.ledger:audit": None,
    }
    assert ledger(kit, "o1") == ["audit", "first", "second"]
    kit.assert_processed("shop", "o1", duplicates=0)


def test_wildcard_source_handler_sees_every_source(idemhook):
    kit = idemhook(LEDGER)
    assert kit.deliver("other", {"id": "x1"}).json["status"] == "processed"
    assert kit.deliver("shop", {"id": "x2", "type": "invoice.sent"}).json["status"] == "processed"
    assert ledger(kit, "x1") == ["audit"]
    assert ledger(kit, "x2") == ["audit"]  # order.* handlers did not match


def test_second_handler_raising_rolls_back_the_first_and_the_claim(idemhook):
    kit = idemhook(LEDGER)
    event = {"id": "o2", "type": "order.paid", "second": "raise"}
    response = kit.deliver("shop", event)
    assert response.status_code == 500
    assert response.json["error"] == "handler_failed"
    assert "tests.plugins.ledger:second" in response.json["message"]
    assert ledger(kit, "o2") == []  # first's row was written, then rolled back with second's
    kit.assert_not_recorded("shop", "o2")
    [failure] = kit.failures("shop", "o2")
    assert failure.permanent is False
    assert "RuntimeError: the warehouse API is down" in failure.error


def test_ignore_from_some_handlers_leaves_the_event_processed(idemhook):
    kit = idemhook(LEDGER)
    event = {"id": "o3", "type": "order.paid", "first": "ignore", "second": "ignore"}
    # audit runs too and returns None: one handler acted, so the event is processed.
    response = kit.deliver("shop", event)
    assert response.status_code == 200
    assert response.json["status"] == "processed"
    assert response.json["result"]["tests.plugins.ledger:first"] == {"ignored": "first ignores it"}
    assert response.json["result"]["tests.plugins.ledger:second"] == {
        "ignored": "second ignores it"
    }
    assert ledger(kit, "o3") == ["audit", "first", "second"]


def test_ignore_keeps_the_claim_answers_200_and_redelivery_is_duplicate(idemhook):
    kit = idemhook(IGNORING)
    response = kit.deliver("shop", {"id": "o4", "type": "order.paid", "first": "ignore"})
    assert response.status_code == 200
    assert response.json == {
        "event_id": "o4",
        "status": "ignored",
        "result": {"ignored": "first ignores it"},
    }
    assert ledger(kit, "o4") == ["first"]  # Ignore is not an error: work done is kept
    again = kit.deliver("shop", {"id": "o4", "type": "order.paid", "first": "ignore"})
    assert again.json["status"] == "duplicate"
    assert again.json["result"] == {"ignored": "first ignores it"}
    kit.assert_ignored("shop", "o4", reason="first ignores it", duplicates=1)
    assert kit.failures("shop", "o4") == []


IGNORING = {
    "plugins": ["tests.plugins.ledger_first"],
    "sources": LEDGER["sources"],
}


@pytest.mark.parametrize("how", ["reject", "reject-deep"])
def test_reject_rolls_back_records_permanent_failure_and_answers_200(idemhook, how):
    kit = idemhook(LEDGER)
    event = {"id": "o5", "type": "order.paid", "second": how}
    reason = "unknown currency" if how == "reject" else "order total is negative"
    response = kit.deliver("shop", event)
    assert response.status_code == 200  # the provider stops retrying
    assert response.json == {"event_id": "o5", "status": "rejected", "result": {"rejected": reason}}
    assert ledger(kit, "o5") == []  # first's work and second's are rolled back; audit never ran
    kit.assert_rejected("shop", "o5", reason=reason)
    [failure] = kit.failures("shop", "o5")
    assert failure.error == f"tests.plugins.ledger:second rejected the event: {reason}"
    assert bytes(failure.raw_body).startswith(b'{"id": "o5"')

    again = kit.deliver("shop", event)
    assert again.status_code == 200
    assert again.json == {"event_id": "o5", "status": "duplicate", "result": {"rejected": reason}}
    assert ledger(kit, "o5") == []
    kit.assert_rejected("shop", "o5", duplicates=1)  # still exactly one failure row


def test_reject_in_a_batch_touches_only_its_event(idemhook):
    kit = idemhook(LEDGER)
    batch = [
        {"id": "b1", "type": "order.paid"},
        {"id": "b2", "type": "order.paid", "second": "reject"},
        {"id": "b3", "type": "order.paid"},
    ]
    response = kit.deliver("shop-batch", batch)
    assert response.status_code == 200
    assert [(e["event_id"], e["status"]) for e in response.json["events"]] == [
        ("b1", "processed"),
        ("b2", "rejected"),
        ("b3", "processed"),
    ]
    assert ledger(kit, "b2") == []
    assert ledger(kit, "b3") == ["audit", "first", "second"]
    kit.assert_rejected("shop-batch", "b2", reason="unknown currency")
    again = kit.deliver("shop-batch", batch)
    assert [e["status"] for e in again.json["events"]] == ["duplicate"] * 3


def test_ignore_raised_from_deep_inside_counts_like_returned(idemhook):
    kit = idemhook(IGNORING)

    response = kit.deliver("shop", {"id": "o6", "type": "order.paid", "first": "ignore-deep"})
    assert response.json == {
        "event_id": "o6",
        "status": "ignored",
        "result": {"ignored": "a test order"},
    }
    kit.assert_ignored("shop", "o6", reason="a test order")
    assert ledger(kit, "o6") == ["first"]


def test_outcomes_and_plugin_migrations_on_sqlite(tmp_path):
    from sqlalchemy import create_engine, text

    from idemhook import create_app
    from idemhook.testing import deliver

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": LEDGER})
    upgraded = app.test_cli_runner().invoke(args=["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert "ledger_0001" in upgraded.output  # the plugin's own revision was applied
    client = app.test_client()

    rejected = deliver(client, "shop", {"id": "q1", "type": "order.paid", "second": "reject"})
    assert rejected.status_code == 200 and rejected.json["status"] == "rejected"
    ignored = deliver(client, "shop", {"id": "q2", "type": "order.paid", "first": "ignore"})
    assert ignored.json["result"]["tests.plugins.ledger:first"] == {"ignored": "first ignores it"}
    assert deliver(client, "shop", {"id": "q1", "type": "order.paid"}).json["status"] == (
        "duplicate"
    )
    engine = create_engine(url)
    with engine.connect() as conn:
        statuses = conn.execute(text("SELECT event_id, status FROM processed_events ORDER BY 1"))
        assert statuses.all() == [("q1", "rejected"), ("q2", "processed")]
        failures = conn.execute(text("SELECT event_id, permanent FROM delivery_failures"))
        assert failures.all() == [("q1", 1)]
        assert conn.execute(text("SELECT event_id FROM ledger ORDER BY 1")).scalars().all() == [
            "q2",
            "q2",
            "q2",
        ]
    engine.dispose()
    app.extensions["idemhook.db"].engine.dispose()
