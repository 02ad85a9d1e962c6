"""How the dashboard shows values: times, ages, JSON, percentages (called from templates)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from idemhook._store.engine import aware


def when(value: Any) -> str:
    if value is None:
        return "-"
    return aware(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(value: Any) -> str:
    if value is None:
        return "-"
    seconds = max(0, int((datetime.now(UTC) - aware(value)).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
