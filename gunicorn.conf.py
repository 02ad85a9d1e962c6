"""gunicorn settings for ``gunicorn 'app:create_app()'`` run from a clone: the shipped ones.

They live in the installed package (``app/gunicorn_conf.py``), which ``idemhook serve``
uses from any directory; this file only loads them, so the two cannot drift.
"""

from app.gunicorn_conf import *  # noqa: F403
