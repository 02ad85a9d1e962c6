"""Flask's JSON answers through idemhook's provider: byte for byte what Flask's own writes."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import uuid

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from hypothesis import given
from hypothesis import strategies as st

from idemhook._web.json_provider import JSONProvider

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@dataclasses.dataclass
class Point:
    x: int
    y: str


def providers() -> tuple[DefaultJSONProvider, JSONProvider]:
    app = Flask(__name__)
    return DefaultJSONProvider(app), JSONProvider(app)


@given(json_values)
def test_answers_are_what_flasks_own_provider_writes(value):
    flask_own, ours = providers()
    assert ours.dumps(value) == flask_own.dumps(value)
    assert ours.dumps(value, separators=(",", ":")) == flask_own.dumps(value, separators=(",", ":"))
    assert ours.dumps(value, indent=2) == flask_own.dumps(value, indent=2)


def test_values_json_cannot_hold_are_converted_as_flask_converts_them():
    flask_own, ours = providers()
    value = {
        "when": datetime.datetime(2026, 12, 1, 21, 30, tzinfo=datetime.UTC),
        "day": datetime.date(2026, 12, 1),
        "amount": decimal.Decimal("12.50"),
        "id": uuid.UUID("8e03978e-40d5-43e8-bc93-6894a57f9324"),
        "point": Point(1, "é"),
    }
    assert ours.dumps(value) == flask_own.dumps(value)


def test_the_receiver_answers_through_it(make_app):
    assert isinstance(make_app().json, JSONProvider)
