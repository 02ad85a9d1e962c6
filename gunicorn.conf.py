"""gunicorn defaults for `gunicorn 'app:create_app()'` (the Procfile's web process).

Measured choices are explained in docs/performance.md; every value can be
overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "sync"
# Providers give up after 5-15 s; a request still running after 30 s is stuck.
timeout = 30
graceful_timeout = 20
