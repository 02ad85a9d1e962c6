"""Random interleavings of deliveries, duplicates, handler failures and redeliveries.

The property: the applied effects are exactly the events that were answered
``processed``, each applied once per claim; every answer is what a provider should
see. Pruning a claim (deleting its processed_events row, as retention does) is
part of the mix: a redelivery after it is applied again, as docs/guarantees.md says.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idemhook.testing import deliver
from tests.reliability.conftest import truncate

pytestmark = pytest.mark.fault

IDS = ["e1", "e2", "e3", "e4"]

ids = st.sampled_from(IDS)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), ids),
        st.tuples(st.just("batch"), st.lists(ids, min_size=1, max_size=5)),
        st.tuples(st.just("break"), ids),  # the handler starts failing for this ID
        st.tuples(st.just("fix"), ids),
        st.tuples(st.just("prune"), st.sampled_from(["acme", "batched"]), ids),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=steps)
def test_effects_equal_events_answered_processed_each_once(make_app, db_url, sql, steps):
    truncate(db_url)
    client = make_app().test_client()
    applied: set[tuple[str, str]] = set()  # claims held: (source, event_id)
    processed: Counter[tuple[str, str]] = Counter()  # answers "processed"
    broken: set[str] = set()
    failures = 0

    def expect(source: str, event_id: str) -> str:
        if (source, event_id) in applied:
            return "duplicate"
        if event_id in broken:
            return "failed"
        applied.add((source, event_id))
        processed[(source, event_id)] += 1
        return "processed"

    for action, arg, *rest in steps:
        if action == "prune":
            event_id = rest[0]
            sql(
                "DELETE FROM processed_events WHERE source = :s AND event_id = :e",
                s=arg,
                e=event_id,
            )
            applied.discard((arg, event_id))
        elif action == "break" and arg not in broken:
            sql("INSERT INTO test_failures VALUES (:e, 'broken by the test')", e=arg)
            broken.add(arg)
        elif action == "fix" and arg in broken:
            sql("DELETE FROM test_failures WHERE event_id = :e", e=arg)
            broken.discard(arg)
        elif action == "deliver":
            expected = expect("acme", arg)
            answer = deliver(client, "acme", {"id": arg, "type": "contact.updated"})
            if expected == "failed":
                failures += 1
                assert answer.status_code == 500 and answer.json["error"] == "handler_failed"
            else:
                assert answer.status_code == 200 and answer.json["status"] == expected
        elif action == "batch":
            expected_all = [expect("batched", event_id) for event_id in arg]
            answer = deliver(client, "batched", [{"id": e, "type": "t"} for e in arg])
            failures += expected_all.count("failed")
            if "failed" in expected_all:
                assert answer.status_code == 500 and answer.json["error"] == "handler_failed"
            else:
                assert answer.status_code == 200
            assert [e["status"] for e in answer.json["events"]] == expected_all

    effects = Counter(sql("SELECT source, event_id FROM test_effects"))
    assert effects == processed
    # Without pruning, that is exactly once each.
    if not any(step[0] == "prune" for step in steps):
        assert set(effects.values()) <= {1}
    claims = set(sql("SELECT source, event_id FROM processed_events"))
    assert claims == applied
    assert sql("SELECT count(*) FROM delivery_failures")[0][0] == failures
