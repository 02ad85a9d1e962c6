"""How tests get their PostgreSQL: an explicit URL, the local server, or a throwaway cluster."""

from __future__ import annotations

import pytest

from idemhook.testing import postgres

DEAD = "postgresql+psycopg2://postgres@127.0.0.1:1/postgres"


def test_unreachable_test_database_url_fails_loudly(monkeypatch):
    monkeypatch.setenv("TEST_DATABASE_URL", DEAD)
    with pytest.raises(postgres.NoPostgres, match="TEST_DATABASE_URL is set but unreachable"):
        postgres.server_url()


def test_without_a_server_a_throwaway_cluster_is_started(monkeypatch):
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    url, cluster = postgres.server_url(local=DEAD)
    try:
        assert cluster is not None and url.port == cluster.port
        database = postgres.create_database(url)
        assert postgres.reachable(database) is None
        postgres.drop_database(database)
    finally:
        cluster.destroy()
    assert postgres.reachable(url) is not None


def test_with_nothing_available_the_message_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    monkeypatch.setattr(postgres, "find_bindir", lambda: None)
    with pytest.raises(postgres.NoPostgres) as info:
        postgres.server_url(local=DEAD)
    assert "no initdb/pg_ctl" in str(info.value)
    assert "Set TEST_DATABASE_URL" in str(info.value)
