"""together.ai's rate-limit headers: passed to the client unchanged, remembered per model.

together answers carry `x-ratelimit-limit|remaining|reset` (requests) and
`x-tokenlimit-limit|remaining` (tokens); 429s also `retry-after` / `retry-after-ms`, and SDKs
honour `x-should-retry`. The proxy passes every one of them on as received, and keeps the last
numeric values seen per model so operators see the account's headroom.
"""

from __future__ import annotations

from collections.abc import Mapping

# header -> gauge kind (None: passed on, not a gauge)
RATE_LIMIT_HEADERS: dict[str, str | None] = {
    "x-ratelimit-limit": "request_limit",
    "x-ratelimit-remaining": "request_remaining",
    "x-ratelimit-reset": "request_reset_seconds",
    "x-tokenlimit-limit": "token_limit",
    "x-tokenlimit-remaining": "token_remaining",
    "retry-after": None,
    "retry-after-ms": None,
    "x-should-retry": None,
}


def passed(upstream: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit headers of an upstream answer, to pass on as they came."""
    return {name: upstream[name] for name in RATE_LIMIT_HEADERS if name in upstream}


def gauge_values(headers: Mapping[str, str]) -> dict[str, float]:
    """kind -> value of the numeric rate-limit headers among `headers` (others are skipped)."""
    values = {}
    for name, value in headers.items():
        kind = RATE_LIMIT_HEADERS.get(name)
        if kind is None:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if number == number and abs(number) != float("inf"):  # not NaN, finite
            values[kind] = number
    return values


class LastSeen:
    """The last rate-limit values per (model label, kind): gauges, not counters."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float] = {}

    def observe(self, model: str, headers: Mapping[str, str]) -> None:
        for kind, value in gauge_values(headers).items():
            self.values[(model, kind)] = value
