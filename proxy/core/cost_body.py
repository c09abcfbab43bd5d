"""The cost in the response body, for clients that opt in (`X-Meter-Cost: usage`).

`usage.cost` is the request's exact cost in USD as a JSON number (the same decimal the ledger
records and `x-meter-cost-usd` carries), written where SDKs parse it: the `usage` object of a
non-streaming answer, and of every stream chunk that carries usage.
"""

from __future__ import annotations

from typing import Any

import orjson


def _with_cost(obj: Any, cost_text: str) -> bool:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return False
    usage["cost"] = orjson.Fragment(cost_text.encode())  # the exact decimal, not a float
    return True


def body_with_cost(data: bytes, cost_text: str) -> bytes:
    """A JSON answer with `usage.cost` set; unchanged when it has no usage object."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    return orjson.dumps(obj) if _with_cost(obj, cost_text) else data


def event_with_cost(obj: dict[str, Any], cost_text: str) -> bytes | None:
    """The SSE event (`data: ...`) of a parsed chunk with `usage.cost` set, or None."""
    if not _with_cost(obj, cost_text):
        return None
    return b"data: " + orjson.dumps(obj) + b"\n\n"
