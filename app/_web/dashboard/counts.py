"""Counts that stay fast on big tables: exact up to a bound, estimated past it, and saying so.

``count(*)`` over millions of rows reads every one of them. The dashboard never
asks for that: :func:`bounded_count` counts at most ``cap + 1`` rows (an index
range read that stops early) and, when there are more, asks PostgreSQL's
planner how many rows the same query would return (``EXPLAIN``, which reads the
table's statistics, not the table). A :class:`Count` knows which it is, and the
pages print estimates as "≈ 1.2M" with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CompoundSelect, Select, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement

#: Rows counted exactly before a count becomes an estimate.
CAP = 10_000


@dataclass(frozen=True, slots=True)
class Count:
    value: int
    #: False: ``value`` is an estimate (planner statistics, or scaled from a sample).
    exact: bool = True
    #: True: no estimate could be had (SQLite); ``value`` is a lower bound.
    at_least: bool = False

    def __add__(self, other: Count) -> Count:
        return Count(
            self.value + other.value,
            self.exact and other.exact,
            self.at_least or other.at_least,
        )

    def __str__(self) -> str:
        if self.at_least:
            return f"≥ {self.value:,}"
        if self.exact:
            return f"{self.value:,}"
        return f"≈ {approximately(self.value)}"


def approximately(value: float) -> str:
    """Two significant figures: 1,234,567 -> 1.2M, 48,213 -> 48k, 812 -> 810."""
    shown, suffix = float(f"{round(value):.2g}"), ""
    for unit in ("k", "M", "G"):
        if shown < 1000:
            break
        shown, suffix = shown / 1000, unit
    return f"{shown:g}{suffix}"


def bounded_count(session: Session, query: Select, cap: int = CAP) -> Count:
    """How many rows ``query`` returns: exact up to ``cap``, else the planner's estimate."""
    found = session.execute(
        select(func.count()).select_from(query.limit(cap + 1).subquery())
    ).scalar_one()
    if found <= cap:
        return Count(found)
    estimated = estimate(session, query)
    if estimated is None:
        return Count(cap, exact=False, at_least=True)
    return Count(max(estimated, cap + 1), exact=False)


def estimate(session: Session, query: Select) -> int | None:
    """The planner's estimate of how many rows ``query`` returns (PostgreSQL), else None."""
    plan = _plan(session, query)
    return None if plan is None else int(plan["Plan Rows"])


def estimate_each(
    session: Session, union: CompoundSelect, params: dict[str, Any]
) -> list[int] | None:
    """The planner's estimate for each query of a ``UNION ALL``, in order: one ``EXPLAIN``."""
    plan = _plan(session, union, params)
    if plan is None:
        return None
    branches = plan.get("Plans", []) if plan["Node Type"] == "Append" else [plan]
    if len(branches) != len(union.selects):
        return None  # not the plan shape this reads: no estimate rather than a wrong one
    return [int(branch["Plan Rows"]) for branch in branches]


class Explain(Executable, ClauseElement):
    """``EXPLAIN (FORMAT JSON) <query>``, the query compiled with its bound parameters."""

    inherit_cache = False  # compiled on each use: it is cheap, and rare

    def __init__(self, query: Select | CompoundSelect) -> None:
        self.query = query


@compiles(Explain, "postgresql")
def _compile_explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (FORMAT JSON) " + compiler.process(element.query, **kw)


def _plan(
    session: Session, query: Select | CompoundSelect, params: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    if session.get_bind().dialect.name != "postgresql":
        return None
    row = session.execute(Explain(query), params or {}).scalar_one()
    return (json.loads(row) if isinstance(row, str) else row)[0]["Plan"]
