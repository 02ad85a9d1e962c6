"""Flask's JSON answers with one encoder built at start-up instead of one per answer.

Flask's default provider passes its options to ``json.dumps`` on every call,
which builds a new ``JSONEncoder`` each time: about 8,000 instructions of a
receiver request that does 1.6 million in all (docs/performance.md). This
provider encodes exactly as the default one does (same ``default``, sorted
keys, ASCII, compact separators) with an encoder built once; calls with their
own options, and debug mode's indented output, go through the default path.
"""

from __future__ import annotations

import json
from typing import Any

from flask.json.provider import DefaultJSONProvider


class JSONProvider(DefaultJSONProvider):
    """:class:`flask.json.provider.DefaultJSONProvider`, with its encoders built once."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self._compact = json.JSONEncoder(
            default=self.default,
            ensure_ascii=self.ensure_ascii,
            sort_keys=self.sort_keys,
            separators=(",", ":"),
        )
        self._plain = json.JSONEncoder(
            default=self.default, ensure_ascii=self.ensure_ascii, sort_keys=self.sort_keys
        )

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if not kwargs:
            return self._plain.encode(obj)
        if kwargs == {"separators": (",", ":")}:
            return self._compact.encode(obj)
        return super().dumps(obj, **kwargs)
