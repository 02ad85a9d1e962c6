"""Server-side prepared statements for the claim's own SQL (``IDEMHOOK_PREPARED_STATEMENTS``).

PostgreSQL parses, analyses and plans every statement it is sent as text. For the
claim's and the idempotency key's statements (long ``INSERT ... ON CONFLICT DO UPDATE``
lists, the key's fenced finish) that work is a large share of the database's CPU per
request: measured from the backend's side (docs/performance.md), a new
``Idempotency-Key`` request's statements cost 1.09 ms as text and 0.78 ms prepared, a
new event's 0.75 ms and 0.64 ms. With the setting on, each lane prepares the registered
statements once on its connection (``PREPARE idemhook_<hash> AS ...``) and sends
``EXECUTE idemhook_<hash>(...)`` in their place, with the same parameters, inside the
same messages (``BEGIN``, the ``SET LOCAL`` timeouts and ``COMMIT`` still travel with them).

A prepared statement belongs to one server session. Through a transaction-mode pooler
(PgBouncer's ``pool_mode = transaction``) consecutive transactions of one connection run
on different server sessions, where the statement does not exist: the setting is off
by default for that reason (docs/configuration.md). Should it be on there anyway, the
first ``EXECUTE`` that meets a session without its statement fails (``26000``); that
transaction rolls back whole (nothing of it is kept, the sender retries it), and
:meth:`Prepared.disable` turns preparing off for the process, saying so in the log.

psycopg2 speaks only the simple query protocol, so the statements are prepared with SQL
``PREPARE`` (its parameter types inferred by PostgreSQL from where each is used). A
statement PostgreSQL refuses to prepare is sent as text, as before.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

log = logging.getLogger("idemhook.db")

#: A psycopg2 named parameter, and its escaped percent sign.
_PARAMETER = re.compile(r"%\((\w+)\)s|%%")
#: How many distinct messages each lane keeps translated (a batch's size varies them).
CACHE_SIZE = 256
#: SQLSTATE invalid_sql_statement_name: an EXECUTE of a statement the session lacks.
MISSING = "26000"
#: SQLSTATE duplicate_prepared_statement: the session has a statement of that name, which
#: (the name being a hash of the SQL) is this one. A lane's connection goes back to the
#: engine's pool when more lanes were open than are kept, with its statements still
#: prepared, and a lane opened later may get that connection: nothing to prepare then.
DUPLICATE = "42P05"
#: SQLSTATE feature_not_supported, as PostgreSQL refuses a prepared statement whose result
#: columns a schema change altered ("cached plan must not change result type"): the lane's
#: connection is replaced (a migration changing a returned column's type, while running).
STALE = "0A000"
#: Parameters whose type PostgreSQL cannot infer from where they are used (``$1 IS NULL``,
#: ``$1 * interval '1 second'``); every other one is ``unknown``: inferred, as for text.
TYPES = {
    "fingerprint": "text",
    "ttl_seconds": "double precision",
    "lease_seconds": "double precision",
}


class Statement:
    """One registered statement: its name and its ``PREPARE`` and ``EXECUTE`` forms."""

    __slots__ = ("sql", "name", "prepare_sql", "execute_sql")

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.name = "idemhook_" + hashlib.sha1(sql.encode()).hexdigest()[:16]
        names: list[str] = []

        def numbered(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "%"  # %% in psycopg2's syntax; PREPARE is sent without parameters
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        body = _PARAMETER.sub(numbered, sql)
        types = ", ".join(TYPES.get(name, "unknown") for name in names)
        self.prepare_sql = (
            f"PREPARE {self.name}({types}) AS {body}"
            if names
            else (f"PREPARE {self.name} AS {body}")
        )
        arguments = ", ".join(f"%({name})s" for name in names)
        self.execute_sql = f"EXECUTE {self.name}({arguments})" if names else f"EXECUTE {self.name}"


class Prepared:
    """The statements the lanes of one engine prepare, and the switch that turns it off.

    Statements are registered at start-up (:meth:`register`); each lane prepares them on
    its connection when it opens (:meth:`prepare_on`) and translates its messages
    (:meth:`translate`): every ``; ``-separated part that is a registered statement
    becomes its ``EXECUTE``. A statement PostgreSQL refuses to prepare is dropped from the
    registry and stays text.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        #: Registered statements by their SQL text; replaced whole, never changed in place.
        self.statements: dict[str, Statement] = {}
        #: Bumped whenever the registry changes: a lane prepared for an older one catches up.
        self.version = 0
        #: Statements PostgreSQL refused to prepare: never registered again.
        self._refused: set[str] = set()
        #: Messages :meth:`use` has registered already.
        self._seen: set[str] = set()

    def register(self, *sqls: str) -> None:
        """Prepare these statements from each lane's next use on (a message of several:
        each of its ``; ``-separated statements)."""
        if not self.enabled:
            return
        statements = dict(self.statements)
        for message in sqls:
            for sql in message.split("; ") if message else ():
                if sql and sql not in statements and sql not in self._refused:
                    statements[sql] = Statement(sql)
        if len(statements) != len(self.statements):
            self.statements = statements
            self.version += 1

    def use(self, message: str) -> None:
        """Register ``message``'s statements unless they are known already: for statements
        made at run time (one per source), registered on their first use (which runs as
        text) and prepared by each lane before its next transaction."""
        if self.enabled and message not in self._seen:
            self._seen.add(message)
            self.register(message)

    def prepare_on(self, cursor: Any, done: set[str]) -> None:
        """Prepare on ``cursor``'s session (autocommit, outside any transaction) each
        registered statement not in ``done``, adding its name there."""
        for statement in list(self.statements.values()):
            if statement.name in done:
                continue
            try:
                cursor.execute(statement.prepare_sql)
            except Exception as exc:  # noqa: BLE001 (the database's refusal, any kind)
                code = getattr(exc, "pgcode", None)
                if code is None:
                    raise  # not a refusal of the statement: the connection's problem
                if code != DUPLICATE:
                    self._drop(statement, exc)
                    continue
            done.add(statement.name)

    def translate(self, message: str, done: set[str]) -> str:
        """``message`` with each registered part prepared on this session as its EXECUTE."""
        statements = self.statements
        parts = message.split("; ")
        changed = False
        for i, part in enumerate(parts):
            statement = statements.get(part)
            if statement is not None and statement.name in done:
                parts[i] = statement.execute_sql
                changed = True
        return "; ".join(parts) if changed else message

    def disable(self, error: Exception) -> None:
        """A session lacked a prepared statement: a transaction-mode pooler. Off, for good."""
        if not self.enabled:
            return
        self.enabled = False
        self.statements = {}
        self.version += 1
        log.error(
            "IDEMHOOK_PREPARED_STATEMENTS is on, but a database session lacked idemhook's "
            "prepared statements (%s): DATABASE_URL goes through a transaction-mode pooler. "
            "Preparing is now off in this process; that transaction was rolled back and is "
            "retried by its sender. Set IDEMHOOK_PREPARED_STATEMENTS=false "
            "(docs/configuration.md).",
            type(error).__name__,
        )

    def _drop(self, statement: Statement, error: Exception) -> None:
        self._refused.add(statement.sql)
        statements = dict(self.statements)
        statements.pop(statement.sql, None)
        self.statements = statements
        self.version += 1
        log.warning(
            "statement %s (%s...) is sent as text: PostgreSQL refused to prepare it (%s)",
            statement.name,
            statement.sql[:60],
            getattr(error, "pgcode", type(error).__name__),
        )
