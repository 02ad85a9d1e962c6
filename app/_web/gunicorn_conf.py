"""gunicorn settings that ship with idemhook: what ``idemhook serve`` runs with.

``idemhook serve`` passes ``--config python:idemhook._web.gunicorn_conf``; the repository's
``gunicorn.conf.py`` loads this module, so ``gunicorn 'idemhook:create_app()'`` from a
clone gets the same. Measured choices are explained in docs/performance.md
("Server settings, and why"); every value can be overridden on the command line
(``idemhook serve --timeout 60``) or with GUNICORN_CMD_ARGS.
"""

import gc
import os

__all__ = [
    "bind",
    "graceful_timeout",
    "keepalive",
    "post_fork",
    "post_worker_init",
    "threads",
    "timeout",
    "worker_class",
    "workers",
]

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# One process per core, each with a few threads: a request spends about half its
# time waiting for PostgreSQL, and threads overlap those waits at a fraction of a
# process's memory. Measured on 2 cores: 2 x 4 gthread served about twice what
# 4 sync workers did (docs/performance.md).
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "4"))
# Senders and load balancers reuse connections; sync workers close every one.
keepalive = 5
# Providers give up after 5-15 s; a request still running after 30 s is stuck.
timeout = 30
graceful_timeout = 20


def post_fork(server, worker):
    """Size each worker's pool to its threads, unless IDEMHOOK_POOL_SIZE says otherwise."""
    # Runs in the worker before the app is built; a thread never waits for a connection
    # and no connection sits idle (the pool may still overflow to twice this).
    os.environ.setdefault("IDEMHOOK_POOL_SIZE", str(server.cfg.threads))


def post_worker_init(worker):
    """Keep the objects made at start-up out of the worker's garbage collections."""
    # Modules, the app, SQLAlchemy's and Flask's structures: about 90,000 objects that live
    # as long as the worker. A full collection walks them all (about 40 ms here), a pause
    # that every request in flight waits out; frozen, they are never walked again.
    # Measured on the p99 at 70 % of peak in docs/performance.md.
    gc.freeze()
