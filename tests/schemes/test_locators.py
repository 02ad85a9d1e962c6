"""Composite keys, ``sha256:body`` and public URLs in the sources file."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.datastructures import Headers

from idemhook._config import settings, sources
from idemhook._config.locators import MISSING, Composite, parse
from idemhook._values.errors import ConfigError

HUBSPOT_KEY = ["body:portalId", "body:subscriptionId", "body:eventId", "body:occurredAt"]


def test_composite_event_id_has_a_stable_documented_format() -> None:
    key = parse(HUBSPOT_KEY, source="s", key="event_id")
    event = {"portalId": 62515, "subscriptionId": 42, "eventId": 7, "occurredAt": 1700000000000}
    assert key.read(event, Headers()) == "62515:42:7:1700000000000"


def test_composite_parts_are_escaped_so_distinct_tuples_never_collide() -> None:
    key = parse(["body:a", "body:b"], source="s", key="event_id")
    one = key.read({"a": "x:y", "b": "z"}, Headers())
    other = key.read({"a": "x", "b": "y:z"}, Headers())
    assert one == "x%3Ay:z" and other == "x:y%3Az"
    assert key.read({"a": "100%", "b": "1"}, Headers()) == "100%25:1"


def test_composite_with_a_missing_part_is_missing() -> None:
    key = parse(HUBSPOT_KEY, source="s", key="event_id")
    assert key.read({"portalId": 1, "subscriptionId": 2, "eventId": 3}, Headers()) is MISSING


def test_composite_event_type_joins_with_dots() -> None:
    kind = parse(["body:meta.entity", "body:meta.action"], source="s", key="event_type")
    assert isinstance(kind, Composite)
    assert kind.read({"meta": {"entity": "deal", "action": "change"}}, Headers()) == "deal.change"


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        (["body:a"], "event_id"),
        (["body:a", "body:b"], "batch"),
        ("sha256:body", "event_type"),
        ("sha256:raw", "event_id"),
        (["body:a", "sha256:body"], "event_id"),
    ],
)
def test_bad_composite_or_hash_specs_stop_startup(spec, key) -> None:
    with pytest.raises(ConfigError, match=rf"\[sources\.s\] {key}"):
        parse(spec, source="s", key=key)


def test_missing_event_id_is_still_an_error_by_default() -> None:
    config = {"sources": {"x": {"scheme": "hmac-sha256", "secret": "s"}}}
    with pytest.raises(ConfigError, match="event_id: missing"):
        sources.load(config, max_body_bytes=1000)


@pytest.mark.parametrize(
    "url", ["hooks.example.com", "https://h.io/webhooks/x", "https://h.io/?a=1", 42]
)
def test_bad_public_url_is_refused(url) -> None:
    config = {"sources": {"x": {"scheme": "github", "secret": "s", "public_url": url}}}
    with pytest.raises(ConfigError, match=r"\[sources\.x\] public_url"):
        sources.load(config, max_body_bytes=1000)
    with pytest.raises(ConfigError, match="IDEMHOOK_PUBLIC_URL"):
        settings.load({"DATABASE_URL": "sqlite://", "IDEMHOOK_PUBLIC_URL": url})


def test_trusted_proxies_accepts_zero_but_not_negative(monkeypatch) -> None:
    monkeypatch.setenv("IDEMHOOK_TRUSTED_PROXIES", "0")
    assert settings.load({"DATABASE_URL": "sqlite://"})["IDEMHOOK_TRUSTED_PROXIES"] == 0
    monkeypatch.setenv("IDEMHOOK_TRUSTED_PROXIES", "-1")
    with pytest.raises(ConfigError, match="IDEMHOOK_TRUSTED_PROXIES"):
        settings.load({"DATABASE_URL": "sqlite://"})
    monkeypatch.setenv("IDEMHOOK_POOL_SIZE", "0")
    monkeypatch.setenv("IDEMHOOK_TRUSTED_PROXIES", "2")
    with pytest.raises(ConfigError, match="IDEMHOOK_POOL_SIZE"):
        settings.load({"DATABASE_URL": "sqlite://"})


part = st.one_of(st.text(max_size=8), st.integers())


@given(st.lists(st.tuples(part, part, part), min_size=2, max_size=20, unique=True))
def test_distinct_composite_tuples_never_share_a_key(tuples) -> None:
    key = parse(["body:a", "body:b", "body:c"], source="s", key="event_id")
    composed = {key.read({"a": a, "b": b, "c": c}, Headers()) for a, b, c in tuples}
    # Integers and their decimal strings are the same key on purpose (JSON senders vary).
    normalised = {tuple(str(v) for v in t) for t in tuples}
    assert len(composed) == len(normalised)
