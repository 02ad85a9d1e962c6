"""The fault kit: the tools the fault tests break things with, built once.

- :func:`sessions` lists this test database's PostgreSQL sessions of one process role
  (``application_name``: ``idemhook-web``, ``idemhook-worker``, ``idemhook-cli``;
  docs/operations.md), so a test waits on the exact session it means, never on a pattern
  another process (a second ``make test`` beside this one) could match: every run has
  its own database, and every role its own name.
- :func:`terminate` ends those sessions' backends (``pg_terminate_backend``), as a
  failover, an OOM kill of a backend or a pooler's timeout would.
- :class:`Proxy` stands between a process and PostgreSQL and cuts every connection on
  cue (both sides reset at once), as a network partition, a load balancer's idle reset
  or a pooler's restart would: the process loses its connection while PostgreSQL goes on
  with whatever it was doing (a COMMIT included).

    with Proxy(pg_url.host, pg_url.port) as proxy, gunicorn(sources, proxy.url(pg_url)):
        ...; proxy.cut()                    # every connection open now is reset
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

_SESSIONS = (
    "SELECT pid, application_name, state, wait_event_type, wait_event, query "
    "FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = :name AND pid <> pg_backend_pid()"
)


def sessions(url: URL | str, name: str, *, state: str | None = None) -> list[Any]:
    """The sessions of role ``name`` in ``url``'s database (only those in ``state``, if given)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(_SESSIONS), {"name": name}).all()
    finally:
        engine.dispose()
    return [row for row in rows if state is None or row.state == state]


def terminate(url: URL | str, pids: list[int]) -> int:
    """End the backends ``pids`` (``pg_terminate_backend``); how many were ended."""
    if not pids:
        return 0
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            ended = conn.execute(
                text("SELECT count(*) FROM unnest(CAST(:pids AS int[])) AS p(pid) "
                     "WHERE pg_terminate_backend(p.pid)"),
                {"pids": list(pids)},
            ).scalar_one()
    finally:
        engine.dispose()
    return int(ended)


#: Upper bound for a proxy's waits (connecting upstream, a cut taking effect); a guard only.
PROXY_GUARD_SECONDS = 30.0
#: SO_LINGER on, 0 seconds: close() resets the connection (RST) instead of a FIN.
_RESET = struct.pack("ii", 1, 0)


class _Link:
    """One proxied connection: the client's socket, the upstream's, and their relay thread."""

    def __init__(self, proxy: Proxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self._wake_r, self._wake_w = socket.socketpair()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._relay, name="faults-proxy-link", daemon=True)

    def cut(self) -> None:
        """Ask the relay thread to reset both sides (it owns the sockets; it closes them)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # closed already: the link has ended by itself

    def _relay(self) -> None:
        reset = False
        peer = {self.client: self.upstream, self.upstream: self.client}
        selector = selectors.DefaultSelector()
        try:
            for sock in (self.client, self.upstream, self._wake_r):
                selector.register(sock, selectors.EVENT_READ)
            while not reset:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        reset = True
                        break
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                    except OSError:
                        data = b""
                    if not data:  # one side closed: close the other (a FIN, as it would see)
                        return
                    try:
                        peer[source].sendall(data)
                    except OSError:
                        return
        finally:
            selector.close()
            for sock in (self.client, self.upstream):
                if reset:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                    except OSError:
                        pass
                sock.close()
            self._wake_r.close()
            self._wake_w.close()
            self.proxy._forget(self)
            self.closed.set()


class Proxy:
    """A TCP proxy on 127.0.0.1 (a free port) to ``host:port`` that cuts connections on cue.

    ``with Proxy(host, port) as proxy``: it listens until the block ends, then resets
    whatever is still open. ``proxy.url(db_url)`` is ``db_url`` through the proxy;
    ``proxy.cut()`` resets every connection open at that moment, the client's side and
    PostgreSQL's (SO_LINGER 0: an RST, no FIN), and returns how many it cut; connections
    opened afterwards work as usual. At most ``max_links`` connections at once (more are
    refused with a reset); its threads are daemons, so nothing outlives the process.
    """

    def __init__(self, host: str | None, port: int | None, *, max_links: int = 64) -> None:
        self.upstream = (host or "127.0.0.1", int(port or 5432))
        self.max_links = max_links
        self.host = "127.0.0.1"
        self.port = 0
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept, name="faults-proxy", daemon=True)

    def __enter__(self) -> Proxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(self.max_links)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._stop_w.send(b"x")
        except OSError:
            pass
        self._thread.join(PROXY_GUARD_SECONDS)
        self.cut()
        self._stop_r.close()
        self._stop_w.close()

    def url(self, db_url: URL | str) -> URL:
        """``db_url`` with its host and port replaced by the proxy's."""
        return make_url(db_url).set(host=self.host, port=self.port)

    @property
    def connections(self) -> int:
        """How many proxied connections are open now."""
        with self._lock:
            return len(self._links)

    def cut(self) -> int:
        """Reset every connection open now (both sides); how many were cut."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut()
        for link in links:
            if not link.closed.wait(PROXY_GUARD_SECONDS):
                raise RuntimeError("a proxied connection was not cut")
        return len(links)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept(self) -> None:
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._stop_r, selectors.EVENT_READ)
        try:
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._stop_r in ready:
                    return
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    continue
                self._open(client)
        finally:
            selector.close()
            self._listener.close()

    def _open(self, client: socket.socket) -> None:
        with self._lock:
            full = len(self._links) >= self.max_links
        try:
            if full:
                raise OSError("too many proxied connections")
            upstream = socket.create_connection(self.upstream, timeout=PROXY_GUARD_SECONDS)
        except OSError:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(self, client, upstream)
        with self._lock:
            self._links.add(link)
        link.thread.start()
