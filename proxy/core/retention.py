"""Retention, exports and imports: what `db prune`, `db export` and `db import` compute.

`db prune --before 2026-01` deletes the terminal rows of every period before 2026-01; their
rollups (rollups.py) stay, so `report` gives the same figures for a pruned month as before.
`db export` writes rows as flat JSON Lines (`export_record`), `db import` reads them back
(`import_record`, which names what is wrong with a line). Pure functions here; the ledger
backends store and read.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from proxy.core.pricing import Rates, cache_savings_pusd, format_usd
from proxy.core.records import COLUMNS, IN_FLIGHT, TERMINAL_STATUSES, TOKEN, LedgerRow
from proxy.core.rollups import ROLLUP_KEY, ROLLUP_SUMS, Rollup

_PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune did: rows deleted (their rollups stay), periods touched."""

    rows: int
    periods: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import did: lines read, rows added, rows already there, rows of pruned periods."""

    read: int
    added: int
    present: int  # the same row was in the ledger already (re-imports add nothing)
    pruned: int  # a period `db prune` deleted rows of: its rollups already count them
    seconds: float


class ImportConflict(Exception):
    """`db import`: a request id is in the ledger (or the file) with other content; nothing imported."""


Numbered = tuple[int, LedgerRow]  # (line number in the file, row)


def check_period(value: str, what: str = "--before") -> str:
    if not _PERIOD_RE.match(value):
        raise ValueError(f"{what} must be a month like 2026-01, got {value!r}")
    return value


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
    "unit",
    "quantity_micros",
    "cache_savings_pusd",  # derived from the price table when exported: not read back by `db import`
)
DERIVED_FIELDS = frozenset({"cache_savings_pusd"})
# added after the first export format: a line without them is a row priced by tokens
LATER_FIELDS = {"unit": TOKEN, "quantity_micros": None}


def _iso_us(ts_us: int | None) -> str | None:
    if ts_us is None:
        return None
    return (
        dt.datetime.fromtimestamp(ts_us // 1_000_000, dt.UTC)
        .replace(microsecond=ts_us % 1_000_000)
        .isoformat(timespec="microseconds")  # always with the fraction: one shape on every line
    )


def export_record(row: LedgerRow, rates: Rates | None = None) -> dict[str, Any]:
    """One ledger row as a flat JSON object with a fixed key order and fixed types.

    Flat and typed the same on every line, so it loads into a table (CSV, Parquet, BigQuery)
    as is: money both as exact integer pico-USD and as a decimal string in USD (never a float),
    times both as µs since the epoch and as ISO 8601 UTC. `cache_savings_pusd` is what caching
    saved at `rates` (the model's current rates), null without them or without a known cost.
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
        "unit": row.unit,
        "quantity_micros": row.quantity_micros,
        "cache_savings_pusd": None
        if rates is None or row.cost_pusd is None
        else cache_savings_pusd(row.cached_tokens or 0, rates, row.mode),
    }


def export_rollup(r: Rollup) -> dict[str, Any]:
    """One rollup line, flat, with the cost as a decimal string too."""
    out: dict[str, Any] = {f: getattr(r, f) for f in (*ROLLUP_KEY, *ROLLUP_SUMS)}
    out["cost_usd"] = format_usd(r.cost_pusd, 12)
    return out


# -- import ----------------------------------------------------------------------------------

_TEXT = ("request_id", "tenant", "key_id", "model", "endpoint", "mode", "period", "usage_source", "unit")
_NON_EMPTY = (
    "request_id",
    "tenant",
    "endpoint",
    "mode",
    "period",
    "unit",
)  # a rejected row's model may be ''
_TEXT_OR_NULL = ("feature", "environment", "error_code", "upstream_id")
_INT_OR_NULL = (
    "finished_us",
    "upstream_status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_pusd",
    "reserved_pusd",
    "quantity_micros",
)
_USAGE_SOURCES = ("upstream", "derived", "estimated", "none")
_INT64 = 2**63 - 1
_YEAR_10000_US = 253_402_300_800_000_000


def import_record(data: Any) -> LedgerRow:
    """A `db export` line (already parsed JSON) as a terminal row; ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    data = {**LATER_FIELDS, **data}
    missing = [f for f in EXPORT_FIELDS if f not in data and f not in DERIVED_FIELDS]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    extra = sorted(set(data) - set(EXPORT_FIELDS) - set(DERIVED_FIELDS))
    if extra:
        raise ValueError(f"unknown key(s) {', '.join(extra)}")
    for f in _TEXT:
        if not isinstance(data[f], str) or (f in _NON_EMPTY and not data[f]):
            raise ValueError(
                f"{f} must be a {'non-empty ' if f in _NON_EMPTY else ''}string, got {data[f]!r}"
            )
    for f in _TEXT_OR_NULL:
        if data[f] is not None and not isinstance(data[f], str):
            raise ValueError(f"{f} must be a string or null, got {data[f]!r}")
    for f in ("stream", "stream_complete"):
        if type(data[f]) is not bool:
            raise ValueError(f"{f} must be true or false, got {data[f]!r}")
    for f in ("started_us", *_INT_OR_NULL):
        _check_int(f, data[f], nullable=f != "started_us")
    saved = data.get("cache_savings_pusd")
    if saved is not None and type(saved) is not int:
        raise ValueError(f"cache_savings_pusd must be an integer or null, got {saved!r}")
    _check_meaning(data)
    return LedgerRow(**{f: data[f] for f in COLUMNS})


def _check_int(name: str, value: Any, *, nullable: bool) -> None:
    if value is None and nullable:
        return
    if type(value) is not int or not 0 <= value <= _INT64:
        kind = "a non-negative integer" + (" or null" if nullable else "")
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_meaning(data: dict[str, Any]) -> None:
    """Values that parse but cannot be a terminal ledger row, or disagree with each other."""
    if data["status"] == IN_FLIGHT:
        raise ValueError(
            "status in_flight: export from a stopped ledger (an in-flight row has no final cost)"
        )
    if data["status"] not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {', '.join(TERMINAL_STATUSES)}, got {data['status']!r}")
    if data["usage_source"] not in _USAGE_SOURCES:
        raise ValueError(
            f"usage_source must be one of {', '.join(_USAGE_SOURCES)}, got {data['usage_source']!r}"
        )
    if not _PERIOD_RE.match(data["period"]):
        raise ValueError(f"period must be a month like 2026-11, got {data['period']!r}")
    for us, at in (("started_us", "started_at"), ("finished_us", "finished_at")):
        if data[us] is not None and data[us] >= _YEAR_10000_US:
            raise ValueError(f"{us} must be before the year 10000, got {data[us]!r}")
        if data[at] != _iso_us(data[us]):
            raise ValueError(f"{at} {data[at]!r} does not match {us} {data[us]!r}")
    if data["cost_usd"] != (None if data["cost_pusd"] is None else format_usd(data["cost_pusd"], 12)):
        raise ValueError(f"cost_usd {data['cost_usd']!r} does not match cost_pusd {data['cost_pusd']!r}")


def dedupe(batch: list[Numbered]) -> list[Numbered]:
    """One row per request id (a line repeating an earlier one exactly is dropped); two lines of
    one request id with different content are a conflict."""
    seen: dict[str, Numbered] = {}
    for n, r in batch:
        first = seen.setdefault(r.request_id, (n, r))
        if first[1] != r:
            raise ImportConflict(
                f"line {n}: request_id {r.request_id} appears on line {first[0]} with other content "
                f"({difference(first[1], r)})"
            )
    return list(seen.values())


def difference(ledger: LedgerRow, file: LedgerRow) -> str:
    """The first column in which two versions of a row differ, for the conflict message."""
    for c, a, b in zip(COLUMNS, ledger.values(), file.values(), strict=True):
        if a != b:
            return f"{c}: {a!r} there, {b!r} here"
    return "no difference"
