"""Rollups: exact daily sums of the ledger's terminal rows, what reports, budgets and estimates read.

One rollup line per (period, day, tenant, model, feature, environment, mode, endpoint, status,
usage source, unit) holds the number of requests, the rows with token counts, input, output
and cached tokens, the rows with a known cost and that cost in pico-USD, the rows with an
estimated usage and with an unknown cost, and the quantity of a unit other than tokens
(millionths). The ledger backends keep them in the same transaction as the rows
(docs/ledger.md#rollups); `rollup_rows` here is the same GROUP BY in Python (tests, imports).
`day` is cut in the budgets' time zone, as `period` is, so a day never straddles two periods.
Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.records import IN_FLIGHT, LedgerRow

ROLLUP_KEY = (
    "period",
    "day",
    "tenant",
    "model",
    "feature",
    "environment",
    "mode",
    "endpoint",
    "status",
    "usage_source",
    "unit",
)
ROLLUP_SUMS = (
    "requests",
    "with_usage",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "priced",
    "cost_pusd",
    "estimated",
    "cost_unknown",
    "quantity_micros",
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class Rollup:
    """Sums over the terminal rows sharing a key. A dimension a query summed over reads ''."""

    period: str
    day: str  # YYYY-MM-DD in budgets.timezone
    tenant: str
    model: str
    feature: str | None
    environment: str | None
    mode: str
    endpoint: str
    status: str
    usage_source: str
    unit: str = "token"
    requests: int = 0
    with_usage: int = 0  # rows with token counts
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    priced: int = 0  # rows with a known cost
    cost_pusd: int = 0  # sum over the priced rows
    estimated: int = 0  # rows whose usage_source is `estimated`
    cost_unknown: int = 0  # rows whose cost is NULL
    quantity_micros: int = 0  # rows priced per unit (images, audio, video): millionths of `unit`

    def key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in ROLLUP_KEY)

    def sums(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in ROLLUP_SUMS)


@dataclass(frozen=True, slots=True)
class RollupFilter:
    """Which rollup lines a read sums: periods, days from `since_day` on, one tenant, model, feature."""

    periods: tuple[str, ...] = ()
    since_day: str | None = None
    tenant: str | None = None
    model: str | None = None
    feature: str | None = None


def day_of(ts_us: int, periods: Periods) -> str:
    """The local date (budgets.timezone) of a µs timestamp, exactly (no float rounding)."""
    return dt.datetime.fromtimestamp(ts_us // 1_000_000, periods.zone).date().isoformat()


def day_start_us(day: str, periods: Periods) -> int:
    """The first µs of a local date: its midnight, or the first instant after a gap at midnight."""
    start = dt.datetime.fromisoformat(day).replace(tzinfo=periods.zone)
    us = (start.astimezone(dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1)
    while day_of(us, periods) < day:  # a DST gap at midnight: the day starts later
        us += 900_000_000
    return int(us)


class DayCutter:
    """`day_of` for one time zone, remembering the last second asked (the write path calls it)."""

    def __init__(self, periods: Periods) -> None:
        self.zone = periods.zone
        self._second, self._day = -1, ""

    def __call__(self, ts_us: int) -> str:
        second = ts_us // 1_000_000
        if second != self._second:
            self._second, self._day = second, dt.datetime.fromtimestamp(second, self.zone).date().isoformat()
        return self._day


def row_sums(row: LedgerRow) -> tuple[int, ...]:
    """One terminal row's contribution to its rollup line, in ROLLUP_SUMS order."""
    usage = row.prompt_tokens is not None or row.completion_tokens is not None
    return (
        1,
        int(usage),
        row.prompt_tokens or 0,
        row.completion_tokens or 0,
        row.cached_tokens or 0,
        int(row.cost_pusd is not None),
        row.cost_pusd or 0,
        int(row.usage_source == "estimated"),
        int(row.cost_pusd is None),
        row.quantity_micros or 0,
    )


def row_key(row: LedgerRow, day: str) -> tuple[Any, ...]:
    return (row.period, day, row.tenant, row.model, row.feature or None, row.environment or None,
            row.mode, row.endpoint, row.status, row.usage_source, row.unit)  # fmt: skip


def rollup_rows(rows: Iterable[LedgerRow], periods: Periods) -> list[Rollup]:
    """The rollups of `rows`: terminal rows summed per key (in-flight rows are not in any)."""
    cut = DayCutter(periods)
    acc: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        if row.status == IN_FLIGHT:
            continue
        s = acc.setdefault(row_key(row, cut(row.started_us)), [0] * len(ROLLUP_SUMS))
        for i, v in enumerate(row_sums(row)):
            s[i] += v
    return _sorted(acc)


def merge(rollups: Iterable[Rollup]) -> list[Rollup]:
    """Rollups with equal keys added together (what the ledger's upsert does)."""
    acc: dict[tuple[Any, ...], list[int]] = {}
    for r in rollups:
        s = acc.setdefault(r.key(), [0] * len(ROLLUP_SUMS))
        for i, v in enumerate(r.sums()):
            s[i] += v
    return _sorted(acc)


def collapse(rollups: Iterable[Rollup], keep: Iterable[str]) -> list[Rollup]:
    """Summed over every dimension not in `keep` (those read '', or None for feature/environment)."""
    kept = set(keep)
    blank = {f: (None if f in ("feature", "environment") else "") for f in ROLLUP_KEY if f not in kept}
    return merge(Rollup(**{**_fields(r), **blank}) for r in rollups)


def _fields(r: Rollup) -> dict[str, Any]:
    return {f: getattr(r, f) for f in (*ROLLUP_KEY, *ROLLUP_SUMS)}


def _sorted(acc: dict[tuple[Any, ...], list[int]]) -> list[Rollup]:
    def order(item: tuple[tuple[Any, ...], list[int]]) -> tuple[str, ...]:
        return tuple("" if v is None else str(v) for v in item[0])

    return [Rollup(*k, *v) for k, v in sorted(acc.items(), key=order)]
