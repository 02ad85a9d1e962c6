"""Shared pieces of the fault tests: sources, signing, polling and a clean database."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from idemhook.testing.postgres import Cluster, create_database, find_bindir
from tests.conftest import SECRET, SOURCES, TABLES, _migrate

T = TypeVar("T")

#: The test sources plus one whose handler blocks inside its transaction.
FAULT_SOURCES: dict[str, Any] = {
    "plugins": [*SOURCES["plugins"], "tests.plugins.blocker"],
    "sources": {
        **SOURCES["sources"],
        "blocking": {
            "scheme": "hmac-sha256",
            "secret": SECRET,
            "event_id": "body:id",
        },
    },
}

#: The test sources plus one whose handler says which worker and backend ran it.
WHOAMI_SOURCES: dict[str, Any] = {
    "plugins": [*SOURCES["plugins"], "tests.plugins.whoami"],
    "sources": {
        **SOURCES["sources"],
        "whoami": {"scheme": "hmac-sha256", "secret": SECRET, "event_id": "body:id"},
    },
}

#: Guard against a hung test; never a performance assertion.
GUARD_SECONDS = 60.0


def signed_post(
    base_url: str,
    source: str,
    payload: Any,
    *,
    timeout: float = GUARD_SECONDS,
    session: requests.Session | None = None,
) -> requests.Response:
    """POST ``payload`` as JSON, signed like the hmac-sha256 test sources expect.

    ``session``: send on its kept-alive connection (which stays with one gunicorn
    worker) instead of a new one.
    """
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return (session or requests).post(
        f"{base_url}/webhooks/{source}",
        data=body,
        headers={"Content-Type": "application/json", "X-Signature": f"sha256={signature}"},
        timeout=timeout,
    )


def wait_for(probe: Callable[[], T], what: str, timeout: float = GUARD_SECONDS) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def truncate(url: URL) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
    engine.dispose()


@pytest.fixture
def clean_db(pg_url: URL) -> Iterator[URL]:
    """The session's PostgreSQL database, emptied before and after the test."""
    truncate(pg_url)
    yield pg_url
    truncate(pg_url)


@pytest.fixture
def own_cluster() -> Iterator[tuple[Cluster, URL]]:
    """A throwaway PostgreSQL cluster only this test restarts, with a migrated database."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail("the database restart test needs PostgreSQL's initdb and pg_ctl")
    cluster = Cluster(bindir).init().start()
    try:
        url = create_database(cluster.url)
        _migrate(url)
        yield cluster, url
    finally:
        cluster.destroy()
