"""Test plugin with its own table (through its own migration) and every outcome.

Two handlers match ``order.*`` on ``shop`` and ``shop-batch``; each writes a ``ledger`` row, then
does what the payload says: ``{"first": "ignore" | "ignore-deep"}``, ``{"second": "raise" |
"reject" | "reject-deep" | "ignore"}``. ``audit`` sees every event of every source.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text

from idemhook import Ignore, Reject, handler

IDEMHOOK_MIGRATIONS = Path(__file__).with_name("ledger_migrations")


def _write(db, event, name: str) -> None:
    db.execute(
        text("INSERT INTO ledger (source, event_id, handler) VALUES (:s, :e, :h)"),
        {"s": event.source, "e": event.id, "h": name},
    )


@handler("shop", "order.*")
@handler("shop-batch", "order.*")
def first(event, db):
    _write(db, event, "first")
    if event.payload.get("first") == "ignore":
        return Ignore("first ignores it")
    _skip_test_orders(event.payload)
    return {"first": event.id}


def _skip_test_orders(payload):
    if payload.get("first") == "ignore-deep":
        raise Ignore("a test order")


def _validate(payload):
    # A helper deep in the handler's call stack may raise the outcome instead.
    if payload.get("second") == "reject-deep":
        raise Reject("order total is negative")


@handler("shop", "order.*")
@handler("shop-batch", "order.*")
def second(event, db):
    _write(db, event, "second")
    if isinstance(event.payload.get("sleep"), float):
        time.sleep(event.payload["sleep"])  # hold the claim open to widen races
    action = event.payload.get("second")
    if action == "raise":
        raise RuntimeError("the warehouse API is down")
    if action == "reject":
        return Reject("unknown currency")
    if action == "ignore":
        return Ignore("second ignores it")
    _validate(event.payload)
    return {"second": event.id}


@handler("*", "*")
def audit(event, db):
    _write(db, event, "audit")
    return None
