"""The session handlers get: it joins the claim's transaction and refuses to end it.

On a claim lane (PostgreSQL) a handler's ``db.execute(text(...), {...})`` goes straight
to the lane's cursor when nothing would see the difference (:meth:`Lane.run_text
<idemhook._store.lanes.Lane.run_text>` says when): SQLAlchemy's way through the Session,
the Connection and the execution context cost about as many instructions as the rest of
an event's claim (docs/performance.md). Everything else (ORM statements, Core
constructs, typed or expanding parameters, a session with objects to flush, anyone
listening to the engine's events) takes SQLAlchemy's own path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

#: ``(session, statement, params)`` -> the result, or None to take SQLAlchemy's path.
Direct = Callable[["ClaimSession", TextClause, Any], "Rows | None"]


class ClaimSession(Session):
    """The session handlers get: it refuses to end the claim's transaction for them."""

    in_handler = False
    #: Set by the lane whose connection the session is bound to (PostgreSQL).
    direct: Direct | None = None
    #: Set by the lane: sends its pending savepoint before a statement of SQLAlchemy's.
    before_statement: Callable[[], None] | None = None

    def execute(self, statement: Any, params: Any = None, **options: Any) -> Any:  # type: ignore[override]
        direct = self.direct
        if direct is not None and not options and type(statement) is TextClause:
            result = direct(self, statement, params)
            if result is not None:
                return result
        return super().execute(statement, params, **options)

    def _execute_internal(self, *args: Any, **kwargs: Any) -> Any:  # execute, scalar(s)
        if self.before_statement is not None:
            self.before_statement()
        return super()._execute_internal(*args, **kwargs)

    def connection(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.before_statement is not None:
            self.before_statement()
        return super().connection(*args, **kwargs)

    def flush(self, objects: Any = None) -> None:
        if self.before_statement is not None and self.flushes():
            self.before_statement()
        super().flush(objects)

    def flushes(self) -> bool:
        """Whether a statement would make the session flush first (autoflush)."""
        return bool(self._new or self._deleted or self.identity_map)

    def _refuse(self, what: str) -> None:
        if self.in_handler:
            raise RuntimeError(
                f"a handler must not {what} the session: the receiver commits the claim and "
                "every handler's work together (see docs/plugins.md)"
            )

    def commit(self) -> None:
        self._refuse("commit")
        super().commit()

    def rollback(self) -> None:
        self._refuse("roll back")
        super().rollback()

    def close(self) -> None:
        """Session.close, skipped when the session holds nothing: a claim whose handlers
        ran only direct statements never gave it a transaction or an object, and
        Session.close would walk its empty state (about 15,000 instructions)."""
        self._refuse("close")
        if self._transaction is None and not self.flushes():
            return
        super().close()


class Rows(IteratorResult):
    """A direct statement's result: its rows, read at once, and its ``rowcount``.

    The same API as the ``CursorResult`` SQLAlchemy returns for ``text()`` (``scalar``,
    ``one``, ``all``, ``mappings``, ``rowcount``, iteration...), the rows as psycopg2
    gave them, as SQLAlchemy gives them for a ``text()`` without typed columns.
    """

    def __init__(self, keys: Sequence[str], rows: list[Any], rowcount: int) -> None:
        super().__init__(SimpleResultMetaData(keys), iter(rows))
        self.rowcount = rowcount
        self.returns_rows = bool(keys)
