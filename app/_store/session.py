"""The session handlers get: it joins the claim's transaction and refuses to end it."""

from __future__ import annotations

from sqlalchemy.orm import Session


class ClaimSession(Session):
    """The session handlers get: it refuses to end the claim's transaction for them."""

    in_handler = False

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
        self._refuse("close")
        super().close()
