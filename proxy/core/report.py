"""Cost reports and month-end forecasts: pure arithmetic over the ledger's rollups (or rows).

Money stays integer pico-USD and ratios stay exact `Fraction`s until they are shown; nothing is
accumulated in floats. Nothing here does I/O: proxy/cli/report.py and proxy/server/admin.py read
the ledger and call these functions. Estimates live in estimate.py, dedicated-endpoint
chargeback in chargeback.py.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.pricing import PriceTable, cache_savings_pusd, format_usd
from proxy.core.records import LedgerRow
from proxy.core.rollups import Rollup, rollup_rows

GROUPINGS = ("model", "tenant", "feature", "environment", "day")
_PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


class ReportError(ValueError):
    """A report or estimate parameter is invalid (the CLI exits 2, the admin API answers 400)."""


# -- report ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Group:
    """One line of a report: sums over the terminal rows sharing a key."""

    key: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_pusd: int = 0  # over rows whose cost is known
    priced: int = 0  # rows with a known cost (the denominator of the average cost)
    with_usage: int = 0  # rows with token counts (the denominator of the token averages)
    estimated: int = 0  # usage estimated by the proxy's tokenizer, not reported upstream
    cost_unknown: int = 0  # cost NULL (an unpriced model forwarded): not in cost_pusd
    rejected: int = 0  # refused by the proxy, never forwarded (cost 0, or NULL in old rows)
    cached_tokens: int = 0  # a part of input_tokens
    cache_savings_pusd: int = 0  # cached tokens x (input - cached_input), at the table's rates
    units: dict[str, int] = field(default_factory=dict)  # unit -> millionths (images, audio, video)

    def add(self, r: Rollup, prices: PriceTable | None = None) -> None:
        """The rows summed in the rollup line `r`, each counted as one request."""
        self.requests += r.requests
        self.cached_tokens += r.cached_tokens
        if prices is not None:  # `r` keeps model and mode (report_keep)
            self.cache_savings_pusd += cache_savings_pusd(r.cached_tokens, prices.get(r.model), r.mode)
        self.with_usage += r.with_usage
        self.input_tokens += r.input_tokens
        self.output_tokens += r.output_tokens
        self.estimated += r.estimated
        if r.quantity_micros:
            self.units[r.unit] = self.units.get(r.unit, 0) + r.quantity_micros
        self.priced += r.priced
        self.cost_pusd += r.cost_pusd
        if r.status == "rejected":  # whatever their cost: rejected rows are written with cost 0
            self.rejected += r.requests
        else:
            self.cost_unknown += r.cost_unknown


@dataclass(frozen=True, slots=True)
class Report:
    period: str
    by: str
    tenant: str | None
    groups: tuple[Group, ...]
    total: Group


def report_keep(by: str) -> tuple[str, ...]:
    """The rollup dimensions a report grouped by `by` reads (the ledger sums over the others, the
    tenant included: a tenant report asks the ledger for that tenant's lines); model and mode
    price what caching saved."""
    return tuple(dict.fromkeys(("period", by, "model", "mode", "status", "unit")))


def group_key(r: Rollup, by: str) -> str:
    """The value a rollup line is grouped under ('' for no feature or environment)."""
    value = getattr(r, by)
    return "" if value is None else str(value)


def build_report(
    rows: Iterable[LedgerRow],
    period: str,
    by: str = "model",
    tenant: str | None = None,
    periods: Periods | None = None,
    rollups: Iterable[Rollup] = (),
    prices: PriceTable | None = None,
) -> Report:
    """Sum the period's terminal rows per `by`; in-flight rows are left out.

    `rollups` are what the ledger keeps (rollups.py), already of `tenant` if one is given: they
    count as the rows they sum, so a report reads them instead of rows (and a pruned month keeps
    its figures).
    """
    check_report(period, by)
    periods = periods or Periods()
    groups: dict[str, Group] = {}
    total = Group("total")
    mine = (row for row in rows if tenant is None or row.tenant == tenant)
    for r in [*rollup_rows(mine, periods), *rollups]:
        if r.period != period:
            continue
        key = group_key(r, by)
        groups.setdefault(key, Group(key)).add(r, prices)
        total.add(r, prices)
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_pusd, g.key))
    if by == "day":
        ordered = sorted(groups.values(), key=lambda g: g.key)
    return Report(period, by, tenant, tuple(ordered), total)


def check_report(period: str, by: str) -> None:
    """ReportError unless `period` is a month and `by` a grouping."""
    if not _PERIOD_RE.match(period):
        raise ReportError(f"month must look like 2026-11, got {period!r}")
    if by not in GROUPINGS:
        raise ReportError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")


USAGE_KEEP = ("period", "tenant", "model", "feature", "environment", "status")  # what usage_lines reads
_USAGE_SUMS = ("requests", "input_tokens", "output_tokens", "cost_pusd", "estimated")


def usage_lines(rollups: Iterable[Rollup]) -> list[dict[str, Any]]:
    """Per tenant, model, feature and environment: requests, tokens, cost, flagged rows."""
    acc: dict[tuple[str, str, str | None, str | None], dict[str, Any]] = {}
    for r in rollups:
        key = (r.tenant, r.model, r.feature, r.environment)
        line = acc.get(key)
        if line is None:
            names = ("tenant", "model", "feature", "environment")
            line = acc[key] = {**dict(zip(names, key, strict=True)), **dict.fromkeys(_USAGE_SUMS, 0)}
            line.update(cost_unknown=0, rejected=0)
        for name in _USAGE_SUMS:
            line[name] += getattr(r, name)
        if r.status == "rejected":
            line["rejected"] += r.requests
        else:
            line["cost_unknown"] += r.cost_unknown
    return [acc[k] for k in sorted(acc, key=lambda k: tuple("" if v is None else v for v in k))]


def _ratio(num: int, den: int, places: int) -> Decimal | None:
    if den == 0:
        return None
    return round_half_up(Fraction(num, den), places)


def round_half_up(value: Fraction, places: int) -> Decimal:
    """`value` as a Decimal rounded half-up to `places` decimals (exact until this step)."""
    q = Decimal(1).scaleb(-places)
    return (Decimal(value.numerator) / Decimal(value.denominator)).quantize(q, rounding=ROUND_HALF_UP)


def group_view(g: Group, total_cost: int) -> dict[str, Any]:
    """A report line as JSON-able values: counts as ints, money as exact decimal strings."""
    avg_cost = None if g.priced == 0 else round_half_up(Fraction(g.cost_pusd, g.priced), 0)
    return {
        "key": g.key,
        "requests": g.requests,
        "input_tokens": g.input_tokens,
        "output_tokens": g.output_tokens,
        "cost_usd": format_usd(g.cost_pusd),
        "cost_pusd": g.cost_pusd,
        "avg_input_tokens": _str(_ratio(g.input_tokens, g.with_usage, 1)),
        "avg_output_tokens": _str(_ratio(g.output_tokens, g.with_usage, 1)),
        "avg_cost_usd": None if avg_cost is None else format_usd(int(avg_cost)),
        "share": _str(_ratio(g.cost_pusd, total_cost, 4)),
        "estimated_usage": g.estimated,
        "cost_unknown": g.cost_unknown,
        "rejected": g.rejected,
        "cached_tokens": g.cached_tokens,
        "cache_savings_usd": format_usd(g.cache_savings_pusd),
        "units": {u: units_text(q) for u, q in sorted(g.units.items())},
    }


def units_text(micros: int) -> str:
    """Millionths of a unit as an exact decimal string ('1.048576')."""
    return format(Decimal(micros).scaleb(-6).normalize(), "f")


def _str(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def report_view(report: Report, forecast: Forecast | None = None) -> dict[str, Any]:
    """The whole report as a JSON-able mapping."""
    total_cost = report.total.cost_pusd
    data: dict[str, Any] = {
        "period": report.period,
        "by": report.by,
        "tenant": report.tenant,
        "groups": [group_view(g, total_cost) for g in report.groups],
        "total": group_view(report.total, total_cost),
        "notes": {
            "cost_usd": "sum of rows with a known cost; cost_unknown and rejected rows are not in it",
            "averages": "tokens over rows with usage; cost over rows with a known cost",
            "cached_tokens": "a part of input_tokens; cache_savings_usd: cached tokens x (input - "
            "cached_input) at the price table's current rates",
            "units": "quantities billed in units other than tokens: megapixel, image, audio_second, "
            "video_second",
        },
    }
    if forecast is not None:
        data["forecast"] = forecast_view(forecast)
    return data


CSV_COLUMNS = (
    "key",
    "requests",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "avg_input_tokens",
    "avg_output_tokens",
    "avg_cost_usd",
    "share",
    "estimated_usage",
    "cost_unknown",
    "rejected",
    "cached_tokens",
    "cache_savings_usd",
    "units",
)


def report_csv(report: Report) -> str:
    """One line per group and a final `total` line; money as exact decimals."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow((report.by, *CSV_COLUMNS[1:]))
    view = report_view(report)
    for line in [*view["groups"], view["total"]]:
        line = {**line, "units": " ".join(f"{u}={q}" for u, q in line["units"].items())}
        w.writerow(["" if line[c] is None else line[c] for c in CSV_COLUMNS])
    return buf.getvalue()


# -- forecast -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forecast:
    """Projected month-end cost per (tenant, model) from the run rate of the elapsed window."""

    period: str
    window_start: float  # Unix seconds: the start of the period
    window_end: float  # now (the end of the elapsed part)
    period_end: float
    lines: tuple[tuple[str, str, int, int], ...]  # tenant, model, spent, projected (pico-USD)

    @property
    def window(self) -> str:
        return (
            f"run rate over {_iso(self.window_start)} .. {_iso(self.window_end)} "
            f"({_days(self.window_end - self.window_start)} of {_days(self.period_end - self.window_start)} "
            "days), scaled linearly to the whole month"
        )


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _days(seconds: float) -> str:
    return str(round_half_up(Fraction(Decimal(str(seconds))) / 86_400, 2))


FORECAST_KEEP = ("period", "tenant", "model")  # the rollup dimensions a forecast reads


def forecast(
    rows: Iterable[LedgerRow],
    period: str,
    now: float,
    periods: Periods | None = None,
    tenant: str | None = None,
    rollups: Iterable[Rollup] = (),
) -> Forecast | None:
    """Linear month-end projection per tenant and model; None unless `now` lies in `period`."""
    periods = periods or Periods()
    start, end = periods.bounds(period)
    if not (start <= now < end):
        return None
    spent: dict[tuple[str, str], int] = {}
    for r in [*rollup_rows(rows, periods), *rollups]:
        if r.period != period or (tenant is not None and r.tenant != tenant):
            continue
        key = (r.tenant, r.model)
        spent[key] = spent.get(key, 0) + r.cost_pusd
    elapsed = Fraction(Decimal(str(max(now - start, 1.0))))
    length = Fraction(Decimal(str(end - start)))
    lines = tuple(
        (t, m, s, int(round_half_up(s * length / elapsed, 0))) for (t, m), s in sorted(spent.items())
    )
    return Forecast(period, start, now, end, lines)


def forecast_view(f: Forecast) -> dict[str, Any]:
    return {
        "period": f.period,
        "window": f.window,
        "window_start": _iso(f.window_start),
        "window_end": _iso(f.window_end),
        "lines": [
            {"tenant": t, "model": m, "spent_usd": format_usd(s), "projected_month_end_usd": format_usd(p)}
            for t, m, s, p in f.lines
        ],
    }
