"""Cost reports and month-end forecasts: pure arithmetic over ledger rows.

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
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.pricing import format_usd
from proxy.core.records import IN_FLIGHT, LedgerRow
from proxy.core.retention import Aggregate

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
    rejected: int = 0  # refused by the proxy, never forwarded, cost NULL

    def add(self, row: LedgerRow) -> None:
        self.requests += 1
        if row.prompt_tokens is not None or row.completion_tokens is not None:
            self.with_usage += 1
            self.input_tokens += row.prompt_tokens or 0
            self.output_tokens += row.completion_tokens or 0
        if row.usage_source == "estimated":
            self.estimated += 1
        if row.cost_pusd is not None:
            self.priced += 1
            self.cost_pusd += row.cost_pusd
        elif row.status == "rejected":
            self.rejected += 1
        else:
            self.cost_unknown += 1

    def add_aggregate(self, a: Aggregate) -> None:
        """The rows a prune folded into `a`, counted exactly as `add` counted them one by one."""
        self.requests += a.requests
        self.with_usage += a.with_usage
        self.input_tokens += a.input_tokens
        self.output_tokens += a.output_tokens
        if a.usage_source == "estimated":
            self.estimated += a.requests
        self.priced += a.priced
        self.cost_pusd += a.cost_pusd
        if a.status == "rejected":
            self.rejected += a.requests - a.priced
        else:
            self.cost_unknown += a.requests - a.priced


@dataclass(frozen=True, slots=True)
class Report:
    period: str
    by: str
    tenant: str | None
    groups: tuple[Group, ...]
    total: Group


def group_key(row: LedgerRow, by: str, periods: Periods) -> str:
    """The value a row is grouped under ('' for no feature or environment)."""
    if by == "day":
        t = dt.datetime.fromtimestamp(row.started_us / 1e6, periods.zone)
        return t.date().isoformat()
    value = getattr(row, by)
    return "" if value is None else str(value)


def build_report(
    rows: Iterable[LedgerRow],
    period: str,
    by: str = "model",
    tenant: str | None = None,
    periods: Periods | None = None,
    aggregates: Iterable[Aggregate] = (),
) -> Report:
    """Sum the period's terminal rows per `by`; in-flight rows are left out.

    `aggregates` are the period's rows folded by `db prune` (retention.py): they count as
    the rows they replaced.
    """
    if not _PERIOD_RE.match(period):
        raise ReportError(f"month must look like 2026-11, got {period!r}")
    if by not in GROUPINGS:
        raise ReportError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    periods = periods or Periods()
    groups: dict[str, Group] = {}
    total = Group("total")
    for row in rows:
        if row.status == IN_FLIGHT or row.period != period or (tenant is not None and row.tenant != tenant):
            continue
        key = group_key(row, by, periods)
        groups.setdefault(key, Group(key)).add(row)
        total.add(row)
    for a in aggregates:
        if a.period != period or (tenant is not None and a.tenant != tenant):
            continue
        key = a.day if by == "day" else ("" if getattr(a, by) is None else str(getattr(a, by)))
        groups.setdefault(key, Group(key)).add_aggregate(a)
        total.add_aggregate(a)
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_pusd, g.key))
    if by == "day":
        ordered = sorted(groups.values(), key=lambda g: g.key)
    return Report(period, by, tenant, tuple(ordered), total)


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
    }


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
)


def report_csv(report: Report) -> str:
    """One line per group and a final `total` line; money as exact decimals."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow((report.by, *CSV_COLUMNS[1:]))
    view = report_view(report)
    for line in [*view["groups"], view["total"]]:
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


def forecast(
    rows: Iterable[LedgerRow],
    period: str,
    now: float,
    periods: Periods | None = None,
    tenant: str | None = None,
) -> Forecast | None:
    """Linear month-end projection per tenant and model; None unless `now` lies in `period`."""
    periods = periods or Periods()
    start, end = periods.bounds(period)
    if not (start <= now < end):
        return None
    spent: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.status == IN_FLIGHT or row.period != period or (tenant is not None and row.tenant != tenant):
            continue
        key = (row.tenant, row.model)
        spent[key] = spent.get(key, 0) + (row.cost_pusd or 0)
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
