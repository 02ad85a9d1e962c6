"""A handler that answers with the session settings its transaction runs under.

For source ``probe``: the result is ``SHOW <name>`` for each timeout the claim
sets with ``SET LOCAL`` (app.db.Timeouts), as the handler's own session sees
them, so a test can check the bounds really hold where handlers run (behind a
pooler too).
"""

from __future__ import annotations

from sqlalchemy import text

from idemhook import handler

SETTINGS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")


@handler("probe", "*")
def show_settings(event, db):
    return {name: db.execute(text(f"SHOW {name}")).scalar() for name in SETTINGS}
