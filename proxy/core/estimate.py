"""Cost estimates (Serverless vs Batch vs Dedicated) and shared dedicated endpoint chargeback.

Pure arithmetic like report.py: money in integer pico-USD, ratios as exact `Fraction`s until
they are shown. proxy/cli/report.py and proxy/server/admin.py read the ledger and call these functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.pricing import (
    BATCH_NONE,
    BATCH_UNKNOWN,
    PUSD_PER_USD,
    RATE_PLACES,
    PriceTable,
    Rates,
    format_usd,
)
from proxy.core.records import LedgerRow
from proxy.core.report import ReportError
from proxy.core.report import round_half_up as _round
from proxy.core.rollups import Rollup, RollupFilter, day_of, day_start_us, rollup_rows

DAYS_PER_MONTH = 30  # measured traffic is scaled to a 30-day month
SECONDS_PER_MONTH = DAYS_PER_MONTH * 86_400
TOKENS_PER_MTOK = 1_000_000
PER_REQUEST_PLACES = 6  # decimals of per-request USD in tables and summaries (monthly: cents)
UTC = Periods()
_WINDOW_RE = re.compile(r"^([1-9]\d{0,4})([dh])$")


def _plain(value: Fraction, places: int) -> str:
    """An exact-looking decimal string without exponent ('3000', '0.006')."""
    return format(_round(value, places).normalize(), "f")


# -- estimate -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Traffic:
    """Average tokens per request and requests per month (exact fractions when measured)."""

    input_tokens: Fraction
    output_tokens: Fraction
    requests_per_month: Fraction
    source: str = "given"


@dataclass(frozen=True, slots=True)
class Dedicated:
    """A dedicated endpoint at the traffic's volume, against Serverless for one model."""

    monthly_pusd: int
    usd_per_mtok: Decimal  # effective: monthly cost / monthly tokens
    break_even_tokens: int | None  # monthly tokens above which Dedicated is cheaper (None: free model)
    cheaper: str  # "dedicated" | "serverless"


@dataclass(frozen=True, slots=True)
class Estimate:
    model: str
    rates: Rates
    traffic: Traffic
    per_request: Fraction  # serverless pico-USD
    per_request_batch: Fraction
    monthly: int  # serverless pico-USD (rounded half-up)
    monthly_batch: int
    monthly_tokens: int
    dedicated: Dedicated | None = None


def parse_window(text: str) -> int:
    """'7d' or '12h' -> seconds."""
    m = _WINDOW_RE.match(text.strip())
    if not m:
        raise ReportError(f"window must look like 7d or 24h, got {text!r}")
    return int(m.group(1)) * (86_400 if m.group(2) == "d" else 3_600)


def given_traffic(input_tokens: int, output_tokens: int, requests_per_month: int) -> Traffic:
    for name, value in (
        ("input tokens", input_tokens),
        ("output tokens", output_tokens),
        ("requests per month", requests_per_month),
    ):
        if value < 0:
            raise ReportError(f"{name} must be >= 0, got {value}")
    return Traffic(Fraction(input_tokens), Fraction(output_tokens), Fraction(requests_per_month))


ESTIMATE_KEEP = ("day", "tenant", "model", "feature")  # the rollup dimensions an estimate reads


@dataclass(frozen=True, slots=True)
class Window:
    """A measuring window widened to whole days of the rollups (budgets.timezone)."""

    label: str  # as asked: 7d, 24h
    first_day: str  # the day `now - window` falls in: counted whole
    start_us: int  # that day's first µs
    seconds: Fraction  # from start_us to now: what the volume is scaled over
    periods: tuple[str, ...]  # the periods it touches, oldest first


def measuring_window(window: str, now_us: int, periods: Periods) -> Window:
    """The window `window` before `now_us`, starting at midnight of the day it would start in."""
    first_day = day_of(now_us - parse_window(window) * 1_000_000, periods)
    start_us = day_start_us(first_day, periods)
    seconds = Fraction(max(now_us - start_us, 1), 1_000_000)
    return Window(window, first_day, start_us, seconds, months(periods.of(start_us), periods.of(now_us)))


def estimate_filter(params: EstimateParams, now_us: int, periods: Periods) -> RollupFilter:
    """The rollup lines an estimate from the ledger reads: the widened window's days, the filters."""
    window = measuring_window(params.window, now_us, periods)
    return RollupFilter(
        periods=window.periods,
        since_day=window.first_day,
        tenant=params.tenant,
        model=params.model,
        feature=params.feature,
    )


def months(first: str, last: str) -> tuple[str, ...]:
    """The periods from `first` to `last` (YYYY-MM), both included."""
    year, month = (int(x) for x in first.split("-"))
    out: list[str] = []
    while f"{year:04d}-{month:02d}" <= last and len(out) < 1200:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return tuple(out)


def measured_traffic(rollups: Iterable[Rollup], window: Window) -> Traffic | None:
    """T_in, T_out averaged over rows with usage; their count scaled by 30 days / window."""
    n = tin = tout = 0
    for r in rollups:
        n += r.with_usage
        tin += r.input_tokens
        tout += r.output_tokens
    if n == 0:
        return None
    days = _plain(window.seconds / 86_400, 2)
    return Traffic(
        Fraction(tin, n),
        Fraction(tout, n),
        n * Fraction(SECONDS_PER_MONTH) / window.seconds,
        f"ledger, last {window.label} widened to whole days (from {window.first_day} 00:00, {days} days): "
        f"{n} requests x {DAYS_PER_MONTH} days / {days} days",
    )


def dedicated_monthly_pusd(
    monthly_usd: Decimal | None = None,
    gpu_hourly_usd: Decimal | None = None,
    gpus: int | None = None,
    hours_per_month: Decimal | None = None,
) -> int:
    """A dedicated endpoint's monthly cost in pico-USD: given, or hourly rate x GPUs x hours."""
    if monthly_usd is not None:
        value = monthly_usd
    elif gpu_hourly_usd is not None and gpus is not None and hours_per_month is not None:
        value = gpu_hourly_usd * gpus * hours_per_month
    else:
        raise ReportError("give dedicated monthly USD, or GPU hourly USD with GPUs and hours per month")
    if not value.is_finite() or value < 0 or (gpus is not None and gpus < 1):
        raise ReportError("dedicated cost must be a finite amount >= 0 and GPUs >= 1")
    return int((value * PUSD_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def blended_rate(rates: Rates, input_tokens: Fraction, output_tokens: Fraction) -> Fraction | None:
    """Serverless pico-USD per token at this input/output mix (None when there are no tokens)."""
    tokens = input_tokens + output_tokens
    if tokens == 0:
        return None
    return (input_tokens * rates.input + output_tokens * rates.output) / tokens


def break_even_tokens(monthly_pusd: int, blended_pusd_per_token: Fraction) -> int | None:
    """Monthly tokens at which Serverless costs as much as the dedicated endpoint (rounded up)."""
    if blended_pusd_per_token <= 0:
        return None
    q = Fraction(monthly_pusd) / blended_pusd_per_token
    return -(-q.numerator // q.denominator)


def estimate(model: str, rates: Rates, traffic: Traffic, dedicated_pusd: int | None = None) -> Estimate:
    """Cost per request and per month on Serverless and Batch, and Dedicated if a cost is given."""
    per_request = traffic.input_tokens * rates.input + traffic.output_tokens * rates.output
    per_request_batch = traffic.input_tokens * rates.batch_input + traffic.output_tokens * rates.batch_output
    monthly = int(_round(per_request * traffic.requests_per_month, 0))
    monthly_batch = int(_round(per_request_batch * traffic.requests_per_month, 0))
    tokens = (traffic.input_tokens + traffic.output_tokens) * traffic.requests_per_month
    monthly_tokens = int(_round(tokens, 0))
    ded = None
    if dedicated_pusd is not None:
        blended = blended_rate(rates, traffic.input_tokens, traffic.output_tokens)
        per_mtok = (
            _round(Fraction(dedicated_pusd) * TOKENS_PER_MTOK / tokens / PUSD_PER_USD, RATE_PLACES)
            if tokens
            else Decimal("Infinity")
        )
        ded = Dedicated(
            dedicated_pusd,
            per_mtok,
            None if blended is None else break_even_tokens(dedicated_pusd, blended),
            "dedicated" if dedicated_pusd < monthly else "serverless",
        )
    return Estimate(
        model, rates, traffic, per_request, per_request_batch, monthly, monthly_batch, monthly_tokens, ded
    )


def price_for(prices: PriceTable, model: str) -> Rates:
    rates = prices.get(model)
    if rates is None:
        raise ReportError(f"model {model!r} is not in the price table ({prices.source})")
    return rates


def estimates(
    prices: PriceTable, models: Sequence[str], traffic: Traffic, dedicated_pusd: int | None = None
) -> list[Estimate]:
    """The same traffic priced on each model (the first is the one asked about; the rest compared)."""
    return [estimate(m, price_for(prices, m), traffic, dedicated_pusd) for m in models]


# -- display --------------------------------------------------------------------------------


def money(pusd: int | Fraction, places: int = 2) -> str:
    """'$12,000.00', '$3.27': always `places` decimals, rounded half-up; a non-zero amount that
    would round to zero shows as '<$0.01', never as $0."""
    value = _round(Fraction(pusd) / PUSD_PER_USD, places)
    if value == 0 and pusd > 0:
        return f"<${Decimal(1).scaleb(-places)}"
    return f"${value:,.{places}f}"


def per_request_money(pusd: Fraction) -> str:
    """Per-request amounts at PER_REQUEST_PLACES decimals: '$0.006000', '$0.000040'."""
    return money(pusd, PER_REQUEST_PLACES)


def rate_text(rate: int) -> str:
    """A rate (pico-USD per token) as USD per 1M tokens with at least two decimals: '$0.90'."""
    value = Decimal(rate).scaleb(-RATE_PLACES).normalize()
    exponent = value.as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    return f"${value:,.{places}f}"


def tokens_text(value: Fraction) -> str:
    """'3,000' for whole numbers, '2,512.3' otherwise."""
    if value.denominator == 1:
        return f"{value.numerator:,}"
    return f"{_round(value, 1):,}"


def summary(e: Estimate) -> str:
    """The one-line answer: model, rates, traffic -> per request, per month Serverless and Batch."""
    t = e.traffic
    return (
        f"{e.model} at {rate_text(e.rates.input)}/{rate_text(e.rates.output)}, "
        f"{tokens_text(t.input_tokens)} in / {tokens_text(t.output_tokens)} out, "
        f"{tokens_text(t.requests_per_month)} requests/month -> "
        f"{per_request_money(e.per_request)} per request, {money(e.monthly)} per month Serverless, "
        f"{money(e.monthly_batch)} Batch{batch_caveat(e.rates)}"
    )


def batch_caveat(rates: Rates) -> str:
    """' (no batch discount known)' when Batch is priced at the serverless rates, else ''."""
    if rates.batch in (BATCH_NONE, BATCH_UNKNOWN):
        return f" ({rates.batch_terms})"
    return ""


def estimate_view(e: Estimate) -> dict[str, Any]:
    """An estimate as JSON-able values (exact decimal strings for money)."""
    t = e.traffic
    data: dict[str, Any] = {
        "model": e.model,
        "rates_usd_per_mtok": {
            "input": _plain(Fraction(e.rates.input, 10**RATE_PLACES), RATE_PLACES),
            "output": _plain(Fraction(e.rates.output, 10**RATE_PLACES), RATE_PLACES),
            "batch_input": _plain(Fraction(e.rates.batch_input, 10**RATE_PLACES), RATE_PLACES),
            "batch_output": _plain(Fraction(e.rates.batch_output, 10**RATE_PLACES), RATE_PLACES),
        },
        "traffic": {
            "input_tokens": _plain(t.input_tokens, 3),
            "output_tokens": _plain(t.output_tokens, 3),
            "requests_per_month": _plain(t.requests_per_month, 3),
            "monthly_tokens": e.monthly_tokens,
            "source": t.source,
        },
        "serverless": {
            "per_request_usd": _plain(e.per_request / PUSD_PER_USD, 12),
            "monthly_usd": format_usd(e.monthly),
        },
        "batch": {
            "per_request_usd": _plain(e.per_request_batch / PUSD_PER_USD, 12),
            "monthly_usd": format_usd(e.monthly_batch),
            "terms": e.rates.batch,  # discount | rates | none | unknown (docs/configuration.md)
            "note": e.rates.batch_terms,
        },
        "summary": summary(e),
    }
    if e.dedicated is not None:
        d = e.dedicated
        data["dedicated"] = {
            "monthly_usd": format_usd(d.monthly_pusd),
            "effective_usd_per_mtok": None if not d.usd_per_mtok.is_finite() else str(d.usd_per_mtok),
            "break_even_monthly_tokens": d.break_even_tokens,
            "cheaper": d.cheaper,
        }
    return data


# -- what to estimate -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EstimateParams:
    """The parameters of `together-meter estimate` and `POST /admin/estimate`."""

    model: str | None = None
    requests_per_month: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    from_ledger: bool = False
    window: str = "7d"
    feature: str | None = None
    tenant: str | None = None
    dedicated_monthly_usd: Decimal | None = None
    gpu_hourly_usd: Decimal | None = None
    gpus: int | None = None
    hours_per_month: Decimal | None = None
    compare: tuple[str, ...] = ()
    measured_month: str | None = None  # compare the dedicated endpoints' measured month (dedicated.py)

    @property
    def wants_dedicated(self) -> bool:
        return self.dedicated_monthly_usd is not None or self.gpu_hourly_usd is not None

    @property
    def wants_traffic(self) -> bool:
        """False for a measured-month comparison alone (no model, traffic or ledger window asked)."""
        return self.measured_month is None or bool(
            self.model or self.compare or self.from_ledger or self.requests_per_month is not None
        )


_INT_PARAMS = ("requests_per_month", "input_tokens", "output_tokens", "gpus")
_DEC_PARAMS = ("dedicated_monthly_usd", "gpu_hourly_usd", "hours_per_month")
_STR_PARAMS = ("model", "window", "feature", "tenant", "measured_month")


def params_from_mapping(data: Any) -> EstimateParams:
    """Validate a JSON body into EstimateParams (ReportError names the bad field)."""
    if not isinstance(data, dict):
        raise ReportError("the body must be a JSON object")
    known = {*_INT_PARAMS, *_DEC_PARAMS, *_STR_PARAMS, "from_ledger", "compare"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ReportError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name in _INT_PARAMS:
        v = data.get(name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ReportError(f"{name} must be an integer >= 0, got {v!r}")
            values[name] = v
    for name in _DEC_PARAMS:
        v = data.get(name)
        if v is not None:
            values[name] = parse_decimal(v, name)
    for name in _STR_PARAMS:
        v = data.get(name)
        if v is not None:
            if not isinstance(v, str) or not v:
                raise ReportError(f"{name} must be a non-empty string, got {v!r}")
            values[name] = v
    fl = data.get("from_ledger", False)
    if not isinstance(fl, bool):
        raise ReportError(f"from_ledger must be true or false, got {fl!r}")
    values["from_ledger"] = fl
    compare = data.get("compare") or []
    if isinstance(compare, str):
        compare = [m for m in compare.split(",") if m]
    if not isinstance(compare, list) or not all(isinstance(m, str) and m for m in compare):
        raise ReportError("compare must be a list of model ids (or one comma-separated string)")
    values["compare"] = tuple(compare)
    return EstimateParams(**values)


def parse_decimal(value: Any, name: str) -> Decimal:
    """A non-negative finite decimal from a number or string (floats through their repr)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ReportError(f"{name} must be a number, got {value!r}")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except ArithmeticError:
        raise ReportError(f"{name} must be a number, got {value!r}") from None
    if not dec.is_finite() or dec < 0:
        raise ReportError(f"{name} must be a finite number >= 0, got {value!r}")
    return dec


def plan_estimates(
    prices: PriceTable,
    params: EstimateParams,
    rows: Iterable[LedgerRow] = (),
    now_us: int = 0,
    periods: Periods = UTC,
    rollups: Iterable[Rollup] = (),
) -> list[Estimate]:
    """Estimates for given or measured traffic: the model asked about, then each compared model.

    From the ledger without --model (and without --compare), each model seen in the window gets
    its own estimate from its own traffic. Measured traffic comes from the rollups (or rows) of
    the window widened to whole days (`measuring_window`).
    """
    dedicated = None
    if params.wants_dedicated:
        if params.dedicated_monthly_usd is not None and params.gpu_hourly_usd is not None:
            raise ReportError("give either a dedicated monthly cost or a GPU hourly cost, not both")
        dedicated = dedicated_monthly_pusd(
            params.dedicated_monthly_usd, params.gpu_hourly_usd, params.gpus, params.hours_per_month
        )
    head = [params.model] if params.model else []
    if not params.from_ledger:
        missing = [
            n for n in ("requests_per_month", "input_tokens", "output_tokens") if getattr(params, n) is None
        ]
        if not params.model and not params.compare:
            missing.insert(0, "model (or compare)")
        if missing:
            raise ReportError(f"missing {', '.join(missing)} (or estimate from the ledger)")
        assert params.requests_per_month is not None and params.input_tokens is not None
        assert params.output_tokens is not None
        traffic = given_traffic(params.input_tokens, params.output_tokens, params.requests_per_month)
        return estimates(prices, [*head, *params.compare], traffic, dedicated)
    window = measuring_window(params.window, now_us, periods)
    picked = [
        r
        for r in [*rollup_rows(rows, periods), *rollups]
        if r.day >= window.first_day
        and (params.tenant is None or r.tenant == params.tenant)
        and (params.feature is None or r.feature == params.feature)
        and (params.model is None or r.model == params.model)
    ]
    if params.model or params.compare:
        measured = measured_traffic(picked, window)
        if measured is None:
            raise ReportError(f"no requests with usage in the last {params.window} match")
        return estimates(prices, [*head, *params.compare], measured, dedicated)
    out = []
    for model in sorted({r.model for r in picked}):
        per_model = measured_traffic([r for r in picked if r.model == model], window)
        if per_model is not None and model in prices:
            out.append(estimate(model, price_for(prices, model), per_model, dedicated))
    if not out:
        raise ReportError(f"no priced requests with usage in the last {params.window} match")
    return out
