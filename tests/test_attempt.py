"""The fault bracket: what each fault means at each stage, and the loop that carries it out.

The policy (:func:`idemhook._engine.attempt.decide`) is a pure function: checked here case
by case and as properties. The faults themselves are real PostgreSQL errors (a lock
timeout, an ended backend, a refused constraint), classified as the bracket sees them.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from idemhook._engine.attempt import MAX_TRIES, Decision, Fault, classify, decide, run
from idemhook._engine.watchdog import Job, Stage


@pytest.mark.parametrize(
    ("fault", "stage", "tries", "decision"),
    [
        # A kept connection that did not survive a restart, before anything of ours ran.
        (Fault.LOST, Stage.BEFORE_HANDLERS, 1, Decision.RETRY),
        (Fault.LOST, Stage.BEFORE_HANDLERS, 2, Decision.UNAVAILABLE),
        # Past the first handler: never again here, answer from what committed.
        (Fault.LOST, Stage.HANDLERS, 1, Decision.RESOLVE),
        (Fault.LOST, Stage.COMMIT, 1, Decision.RESOLVE),
        # Waited on another transaction's row.
        (Fault.TIMEOUT, Stage.BEFORE_HANDLERS, 1, Decision.IN_PROGRESS),
        (Fault.TIMEOUT, Stage.HANDLERS, 1, Decision.IN_PROGRESS),
        # Whatever the COMMIT (or what was sent with it) met: nothing was kept.
        (Fault.TIMEOUT, Stage.COMMIT, 1, Decision.REFUSED),
        (Fault.ERROR, Stage.COMMIT, 1, Decision.REFUSED),
        # Anything else is a bug of ours, not a fault: raised.
        (Fault.ERROR, Stage.BEFORE_HANDLERS, 1, Decision.RAISE),
        (Fault.ERROR, Stage.HANDLERS, 1, Decision.RAISE),
    ],
)
def test_each_fault_at_each_stage_has_one_decision(fault, stage, tries, decision):
    assert decide(fault, stage, tries) is decision


@given(st.sampled_from(Fault), st.sampled_from(Stage), st.integers(1, 10))
def test_handlers_never_run_twice_and_only_a_refused_commit_is_refused(fault, stage, tries):
    decision = decide(fault, stage, tries)
    if decision is Decision.RETRY:  # the only decision that runs the attempt again
        assert stage is Stage.BEFORE_HANDLERS and fault is Fault.LOST and tries < MAX_TRIES
    assert (decision is Decision.REFUSED) == (stage is Stage.COMMIT and fault is not Fault.LOST)
    if fault is Fault.LOST and stage is not Stage.BEFORE_HANDLERS:
        assert decision is Decision.RESOLVE


def _error_of(db_url, *statements: str) -> DBAPIError:
    """The DBAPIError PostgreSQL answers the last of ``statements`` with."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            with pytest.raises(DBAPIError) as caught:
                for statement in statements:
                    conn.execute(text(statement))
        return caught.value
    finally:
        engine.dispose()


def test_real_errors_are_classified_as_the_bracket_needs(db_url):
    timeout = _error_of(db_url, "SET statement_timeout = 10", "SELECT pg_sleep(1)")
    assert classify(timeout) is Fault.TIMEOUT
    lost = _error_of(db_url, "SELECT pg_terminate_backend(pg_backend_pid())")
    assert classify(lost) is Fault.LOST
    refused = _error_of(db_url, "SELECT 1 / 0")
    assert classify(refused) is Fault.ERROR


class _Script:
    """An attempt that fails as told, then succeeds, recording what the bracket asked."""

    def __init__(self, db_url, failures: list[tuple[Stage, str]]) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self.db_url = db_url

    def once(self, job: Job) -> str:
        self.calls.append("once")
        if not self.failures:
            return "done"
        stage, kind = self.failures.pop(0)
        job.stage = stage
        if kind == "lost":
            raise _error_of(self.db_url, "SELECT pg_terminate_backend(pg_backend_pid())")
        raise _error_of(self.db_url, "SELECT 1 / 0")

    def resolve(self, lost: DBAPIError) -> str:
        self.calls.append("resolve")
        return "resolved"

    def refused(self, error: DBAPIError) -> str:
        self.calls.append("refused")
        return "refused"

    def in_progress(self, error: DBAPIError) -> Exception:
        return RuntimeError("in progress")

    def unavailable(self, error: DBAPIError) -> Exception:
        return RuntimeError("unavailable")

    def abandoned(self) -> str:
        return "abandoned"


def test_the_bracket_retries_once_before_handlers_and_resolves_after(db_url):
    before = _Script(db_url, [(Stage.BEFORE_HANDLERS, "lost")])
    assert run(before, Job()) == "done" and before.calls == ["once", "once"]

    twice = _Script(db_url, [(Stage.BEFORE_HANDLERS, "lost")] * 2)
    with pytest.raises(RuntimeError, match="unavailable"):
        run(twice, Job())

    after = _Script(db_url, [(Stage.HANDLERS, "lost")])
    assert run(after, Job()) == "resolved" and after.calls == ["once", "resolve"]

    commit = _Script(db_url, [(Stage.COMMIT, "error")])
    assert run(commit, Job()) == "refused" and commit.calls == ["once", "refused"]

    bug = _Script(db_url, [(Stage.HANDLERS, "error")])
    with pytest.raises(DBAPIError):
        run(bug, Job())
