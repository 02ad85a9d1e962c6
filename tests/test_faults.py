"""The fault kit's own tools work as the fault tests rely on (tests/faults.py)."""

from __future__ import annotations

import psycopg2
import pytest

from idemhook.testing.postgres import connect_args
from tests.faults import Proxy, sessions
from tests.reliability.conftest import wait_for

#: The application_name of this test's own connections (unique to it, in this database).
NAME = "idemhook-test-proxy"


def connect(url):
    return psycopg2.connect(**connect_args(url), application_name=NAME, connect_timeout=5)


def test_a_proxy_cut_resets_open_connections_and_new_ones_work(pg_url):
    with Proxy(pg_url.host, pg_url.port) as proxy:
        url = proxy.url(pg_url)
        assert (url.host, url.port, url.database) == ("127.0.0.1", proxy.port, pg_url.database)
        conn = connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 41 + 1")
                assert cur.fetchone() == (42,)
            assert proxy.cut() == 1
            with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()
        # PostgreSQL's side was reset too: its backend has gone.
        wait_for(lambda: not sessions(pg_url, NAME), "the cut backend to end")

        again = connect(url)
        try:
            with again.cursor() as cur:
                cur.execute("SELECT current_database()")
                assert cur.fetchone() == (pg_url.database,)
        finally:
            again.close()
        # A connection its client closed is gone from the proxy too: nothing left to cut.
        wait_for(lambda: proxy.connections == 0, "the closed connection to leave the proxy")
        assert proxy.cut() == 0
