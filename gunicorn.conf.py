"""gunicorn settings for ``gunicorn 'idemhook:create_app()'`` run from a clone: the shipped ones.

They live in the installed package (``app/_web/gunicorn_conf.py``), which ``idemhook serve``
uses from any directory; this file only loads them, so the two cannot drift.
"""

from idemhook._web.gunicorn_conf import *  # noqa: F403
