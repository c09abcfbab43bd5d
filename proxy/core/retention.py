"""Retention: fold old ledger rows into daily aggregates, and export rows for billing pipelines.

`db prune --before 2026-01` replaces the terminal rows of every period before 2026-01 by one
aggregate line per (day, tenant, model, endpoint, mode, feature, environment, status, usage
source). The aggregates keep every figure a report needs (requests, tokens, exact cost, how many
rows had usage, a cost, an estimate), so `report` gives the same totals for a pruned month as it
did before. Pure functions here; the ledger backends store and read the aggregates.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.pricing import format_usd
from proxy.core.records import IN_FLIGHT, LedgerRow

_PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")

KEY_FIELDS = (
    "period",
    "day",
    "tenant",
    "model",
    "endpoint",
    "mode",
    "feature",
    "environment",
    "status",
    "usage_source",
)
SUM_FIELDS = ("requests", "with_usage", "input_tokens", "output_tokens", "priced", "cost_pusd")


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Sums over the pruned rows sharing a key (one day, in the budget time zone)."""

    period: str
    day: str  # YYYY-MM-DD in budgets.timezone at prune time
    tenant: str
    model: str
    endpoint: str
    mode: str
    feature: str | None
    environment: str | None
    status: str
    usage_source: str
    requests: int = 0
    with_usage: int = 0  # rows that had token counts
    input_tokens: int = 0
    output_tokens: int = 0
    priced: int = 0  # rows with a known cost
    cost_pusd: int = 0  # sum over the priced rows

    def key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in KEY_FIELDS)

    def sums(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in SUM_FIELDS)


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune did: rows folded and deleted, aggregate lines written, periods touched."""

    rows: int
    aggregates: int
    periods: tuple[str, ...]


def check_period(value: str, what: str = "--before") -> str:
    if not _PERIOD_RE.match(value):
        raise ValueError(f"{what} must be a month like 2026-01, got {value!r}")
    return value


def day_of(ts_us: int, periods: Periods) -> str:
    return dt.datetime.fromtimestamp(ts_us / 1e6, periods.zone).date().isoformat()


def aggregate_rows(rows: Iterable[LedgerRow], periods: Periods) -> list[Aggregate]:
    """Terminal rows summed per aggregate key (in-flight rows are never folded)."""
    acc: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        if row.status == IN_FLIGHT:
            continue
        key = (
            row.period,
            day_of(row.started_us, periods),
            row.tenant,
            row.model,
            row.endpoint,
            row.mode,
            row.feature,
            row.environment,
            row.status,
            row.usage_source,
        )
        s = acc.get(key)
        if s is None:
            s = acc[key] = [0, 0, 0, 0, 0, 0]
        s[0] += 1
        if row.prompt_tokens is not None or row.completion_tokens is not None:
            s[1] += 1
            s[2] += row.prompt_tokens or 0
            s[3] += row.completion_tokens or 0
        if row.cost_pusd is not None:
            s[4] += 1
            s[5] += row.cost_pusd
    return [Aggregate(*k, *v) for k, v in sorted(acc.items(), key=lambda kv: _sort_key(kv[0]))]


def _sort_key(key: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in key)


def merge(aggregates: Iterable[Aggregate]) -> list[Aggregate]:
    """Aggregates with equal keys added together (what the store's upsert does)."""
    acc: dict[tuple[Any, ...], list[int]] = {}
    for a in aggregates:
        s = acc.setdefault(a.key(), [0] * len(SUM_FIELDS))
        for i, v in enumerate(a.sums()):
            s[i] += v
    return [Aggregate(*k, *v) for k, v in sorted(acc.items(), key=lambda kv: _sort_key(kv[0]))]


# -- export ----------------------------------------------------------------------------------

EXPORT_FIELDS = (
    "request_id",
    "tenant",
    "key_id",
    "model",
    "endpoint",
    "mode",
    "feature",
    "environment",
    "stream",
    "status",
    "period",
    "started_at",
    "finished_at",
    "started_us",
    "finished_us",
    "upstream_status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_source",
    "cost_usd",
    "cost_pusd",
    "reserved_pusd",
    "stream_complete",
    "error_code",
    "upstream_id",
)


def _iso_us(ts_us: int | None) -> str | None:
    if ts_us is None:
        return None
    return (
        dt.datetime.fromtimestamp(ts_us // 1_000_000, dt.UTC)
        .replace(microsecond=ts_us % 1_000_000)
        .isoformat(timespec="microseconds")  # always with the fraction: one shape on every line
    )


def export_record(row: LedgerRow) -> dict[str, Any]:
    """One ledger row as a flat JSON object with a fixed key order and fixed types.

    Flat and typed the same on every line, so it loads into a table (CSV, Parquet, BigQuery)
    as is: money both as exact integer pico-USD and as a decimal string in USD (never a float),
    times both as µs since the epoch and as ISO 8601 UTC.
    """
    return {
        "request_id": row.request_id,
        "tenant": row.tenant,
        "key_id": row.key_id,
        "model": row.model,
        "endpoint": row.endpoint,
        "mode": row.mode,
        "feature": row.feature,
        "environment": row.environment,
        "stream": row.stream,
        "status": row.status,
        "period": row.period,
        "started_at": _iso_us(row.started_us),
        "finished_at": _iso_us(row.finished_us),
        "started_us": row.started_us,
        "finished_us": row.finished_us,
        "upstream_status": row.upstream_status,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_tokens": row.cached_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "usage_source": row.usage_source,
        "cost_usd": None if row.cost_pusd is None else format_usd(row.cost_pusd, 12),
        "cost_pusd": row.cost_pusd,
        "reserved_pusd": row.reserved_pusd,
        "stream_complete": row.stream_complete,
        "error_code": row.error_code,
        "upstream_id": row.upstream_id,
    }


def export_aggregate(a: Aggregate) -> dict[str, Any]:
    """One aggregate line, flat, with the cost as a decimal string too."""
    out: dict[str, Any] = {f: getattr(a, f) for f in (*KEY_FIELDS, *SUM_FIELDS)}
    out["cost_usd"] = format_usd(a.cost_pusd, 12)
    return out
