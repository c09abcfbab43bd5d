"""Dedicated endpoints by the minute: what together bills, measured, and spread over tenants.

together bills a dedicated endpoint per minute per running replica at its hardware's
`pricing.cents_per_minute` (GET /v1/hardware). The follower (proxy/server/dedicated.py) looks at
each endpoint and hands an `EndpointMinute` per observed minute to the ledger (table
`endpoint_minutes`); this module is the arithmetic, pure and exact:

* money in integer pico-USD: a cent is 10**10 pico-USD, so an endpoint-minute costs
  replicas x cents_per_minute x 10**10, rounded half-up to a whole pico-USD (exact for any price
  with at most 10 decimals of a cent: no rounding happens at all for together's prices);
* `cents_per_minute` is a Decimal read from the JSON text (never a float);
* a minute is keyed by its start (UTC, µs since the epoch, a multiple of the minute length);
* the replica count comes from the v1 endpoint object (`replicas_of`): known when the endpoint is
  STOPPED (0) or STARTED with min_replicas == max_replicas; otherwise unknown (NULL, never
  guessed), with the bounds the autoscaling range gives;
* two observations of one minute (another poll, a restart, another replica) keep the larger one
  (`rank`): a known count over an unknown one, then more replicas, then the dearer; the same rule
  whatever order they arrive in;
* a measured month is spread over tenants by token share, largest remainder
  (chargeback.split_by_share): the parts add up to the whole exactly.

together's v2 API (`dedicated.api: v2`, `observe_v2`) says more: each deployment of an endpoint
carries its `readyReplicas` and its instance type (`hardware`), priced per replica-hour
(`priceCentsPerHour`, GET /v2/public/inference-instance-types). A minute then costs, exactly,

    x = sum over instance types t of ready_t x price_t (cents/hour) x 10**10 / 60   (pico-USD)

a rational number (a cent per hour is 10**10 / 60 = 166,666,666.67 pico-USD per minute), and the
minute's row stores `round_half_up(x)` = floor(x + 1/2), rounded ONCE per minute row, never per
replica or per instance type (`v2_minute_cost_pusd`). Each row is off by at most 1/2 pico-USD
(1/3 for whole-cent prices: x is then a multiple of 1/3), so a month of N minute rows is within
N/2 pico-USD of the exact rational sum (44,640 minutes: < 0.000000023 USD).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.chargeback import (
    Chargeback,
    DedicatedEndpoint,
    chargeback,
    chargeback_view,
    per_mtok,
    split_by_share,
)
from proxy.core.pricing import PUSD_PER_USD, PriceTable, Rates, format_usd
from proxy.core.report import ReportError
from proxy.core.rollups import Rollup

PUSD_PER_CENT = PUSD_PER_USD // 100  # 10**10
MINUTE_US = 60_000_000  # together bills by the minute
STOPPED = "STOPPED"
STARTED = "STARTED"
MAX_REPLICAS = 100_000  # a replica count beyond this is not believed (the object is malformed)
V2_STOPPED = "DEPLOYMENT_STATE_STOPPED"
V2_DEDICATED = "ENDPOINT_TYPE_DEDICATED"
_CENTS_RE = re.compile(r"^\d{1,9}(\.\d{1,30})?\Z")
_MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])\Z")


class DedicatedError(ValueError):
    """An answer about an endpoint or its hardware that cannot be used (says what is wrong)."""


def check_month(month: str) -> str:
    """`month` if it looks like 2026-11, else ReportError (a usage error on the command line)."""
    if not _MONTH_RE.match(month):
        raise ReportError(f"month must look like 2026-11, got {month!r}")
    return month


# -- minutes and money -------------------------------------------------------------------------


def minute_start(ts_us: int, minute_us: int = MINUTE_US) -> int:
    """The start of the minute `ts_us` falls in (µs since the epoch; minutes are cut in UTC)."""
    return ts_us - ts_us % minute_us


def one_minute(sent_us: int, received_us: int, minute_us: int = MINUTE_US) -> int | None:
    """The minute a round trip lies in, or None when it straddles a boundary.

    The upstream answered somewhere between sending and receiving: only when both fall in the
    same minute is it certain which minute the answer describes.
    """
    first = minute_start(sent_us, minute_us)
    return first if minute_start(received_us, minute_us) == first and received_us >= sent_us else None


def parse_cents(value: Any) -> Decimal:
    """`cents_per_minute` as an exact Decimal: from the JSON text (parsed as Decimal), an int or a
    decimal string; never a float (its binary value is not the price together published)."""
    if isinstance(value, bool | float):
        raise DedicatedError(f"cents_per_minute must be parsed as a decimal, got float {value!r}")
    if isinstance(value, int):
        value = Decimal(value)
    if isinstance(value, str):
        if not _CENTS_RE.match(value):
            raise DedicatedError(f"cents_per_minute must be a decimal number >= 0, got {value!r}")
        value = Decimal(value)
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        raise DedicatedError(f"cents_per_minute must be a finite number >= 0, got {value!r}")
    return value


def cents_text(cents: Decimal) -> str:
    """A price as stored: plain decimal notation, no exponent, trailing zeros dropped ('5.42')."""
    return format(cents.normalize(), "f")


def minute_cost_pusd(replicas: int, cents_per_minute: Decimal) -> int:
    """One endpoint-minute: replicas x cents_per_minute x 10**10 pico-USD, rounded half-up."""
    if replicas < 0:
        raise DedicatedError(f"replicas must be >= 0, got {replicas}")
    exact = Decimal(replicas) * cents_per_minute * PUSD_PER_CENT
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)) if exact else 0


def round_half_up(x: Fraction) -> int:
    """floor(x + 1/2): the nearest integer, halves upwards (x >= 0 here)."""
    half_up = x + Fraction(1, 2)
    return half_up.numerator // half_up.denominator


def replica_minute_pusd(cents_per_hour: Decimal) -> Fraction:
    """One replica-minute at `cents_per_hour`, exactly: cents x 10**10 / 60 pico-USD (rational)."""
    return Fraction(cents_per_hour) * PUSD_PER_CENT / 60


def v2_minute_cost_pusd(ready: Mapping[str, int], cents_per_hour: Mapping[str, Decimal]) -> int:
    """A v2 endpoint-minute: sum of ready replicas x replica_minute_pusd over the instance types,
    rounded half-up once (at most 1/2 pico-USD off the exact value). KeyError: a type unpriced."""
    exact = Fraction(0)
    for instance_type, replicas in ready.items():
        if replicas < 0:
            raise DedicatedError(f"replicas must be >= 0, got {replicas}")
        if replicas:
            exact += replicas * replica_minute_pusd(cents_per_hour[instance_type])
    return round_half_up(exact)


def instance_type_prices(listing: Any) -> dict[str, Decimal]:
    """instance type id -> cents per replica-hour, from GET /v2/public/inference-instance-types
    parsed with Decimal floats (`priceCentsPerHour`; an integer in the SDK's type, a decimal
    accepted). Entries without an id or a usable price are left out (their cost is then unknown)."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        raise DedicatedError("GET /v2/public/inference-instance-types answered without a data list")
    out: dict[str, Decimal] = {}
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        try:
            out[item["id"]] = parse_cents(item.get("priceCentsPerHour"))
        except DedicatedError:
            continue
    return out


def hardware_prices(listing: Any) -> dict[str, Decimal]:
    """hardware id -> cents per minute, from GET /v1/hardware parsed with Decimal floats.

    Entries without an id or a usable price are left out (their endpoints' cost is then unknown).
    """
    data = listing.get("data") if isinstance(listing, dict) else listing
    out: dict[str, Decimal] = {}
    if not isinstance(data, list):
        raise DedicatedError("GET /v1/hardware answered without a data list")
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        pricing = item.get("pricing")
        raw = pricing.get("cents_per_minute") if isinstance(pricing, dict) else None
        try:
            out[item["id"]] = parse_cents(raw)
        except DedicatedError:
            continue
    return out


# -- one observation ---------------------------------------------------------------------------


def _count(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value <= MAX_REPLICAS else None


def replicas_of(endpoint: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(running replicas or None when the object does not tell, low bound, high bound).

    together's v1 DedicatedEndpoint carries `state` and `autoscaling {min_replicas,
    max_replicas}`, no running count: STOPPED runs none; STARTED with min == max runs exactly that
    many (a fixed-size endpoint: how the v1 API scales one by hand); anything else (an autoscaling
    range, PENDING, STARTING, STOPPING, ERROR) is unknown, somewhere in the bounds.
    """
    auto = endpoint.get("autoscaling")
    lo = _count(auto.get("min_replicas")) if isinstance(auto, dict) else None
    hi = _count(auto.get("max_replicas")) if isinstance(auto, dict) else None
    state = endpoint.get("state")
    if state == STOPPED:
        return 0, 0, 0
    if state == STARTED:
        if lo is not None and lo == hi:
            return lo, lo, hi
        return None, lo if lo is not None else 0, hi
    return None, 0, hi  # starting, stopping, failed: none to max may be running


@dataclass(frozen=True, slots=True)
class EndpointMinute:
    """What one endpoint ran in one minute, as observed; one ledger line (endpoint_minutes)."""

    endpoint_id: str
    minute_start: int  # µs since the epoch, UTC, a multiple of the minute length
    period: str  # YYYY-MM in budgets.timezone, as the request rows
    name: str  # together's endpoint name: what inference requests send as `model`
    model: str  # the model the endpoint serves
    hardware: str
    state: str
    replicas: int | None  # running replicas; None: the object did not tell (never guessed)
    min_replicas: int | None
    max_replicas: int | None
    cents_per_minute: Decimal | None  # None: the hardware's price is not known
    cost_pusd: int | None  # replicas x price; None when either is unknown (0 replicas: 0)
    cost_low_pusd: int | None  # bounds of the cost (equal to it when known; None: no bound)
    cost_high_pusd: int | None
    observed_us: int
    cents_per_hour: Decimal | None = None  # v2: the instance type's price per replica-hour (one type)

    @property
    def known(self) -> bool:
        return self.cost_pusd is not None


def _cost(replicas: int | None, cents: Decimal | None) -> int | None:
    if replicas == 0:
        return 0
    if replicas is None or cents is None:
        return None
    return minute_cost_pusd(replicas, cents)


def observe(
    endpoint: Mapping[str, Any],
    prices: Mapping[str, Decimal],
    minute: int,
    observed_us: int,
    periods: Periods,
) -> EndpointMinute:
    """The endpoint-minute a GET /v1/endpoints/{id} answer describes (DedicatedError if malformed)."""
    endpoint_id = endpoint.get("id")
    if not isinstance(endpoint_id, str) or not endpoint_id:
        raise DedicatedError("the endpoint object has no id")
    hardware = endpoint.get("hardware")
    hardware = hardware if isinstance(hardware, str) else ""
    replicas, lo, hi = replicas_of(endpoint)
    cents = prices.get(hardware)
    auto = endpoint.get("autoscaling")
    return EndpointMinute(
        endpoint_id=endpoint_id,
        minute_start=minute,
        period=periods.of(minute),
        name=_text(endpoint.get("name")),
        model=_text(endpoint.get("model")),
        hardware=hardware,
        state=_text(endpoint.get("state")),
        replicas=replicas,
        min_replicas=_count(auto.get("min_replicas")) if isinstance(auto, dict) else None,
        max_replicas=_count(auto.get("max_replicas")) if isinstance(auto, dict) else None,
        cents_per_minute=cents,
        cost_pusd=_cost(replicas, cents),
        cost_low_pusd=_cost(lo, cents) if replicas is None else _cost(replicas, cents),
        cost_high_pusd=_cost(hi, cents) if replicas is None else _cost(replicas, cents),
        observed_us=observed_us,
    )


def _text(value: Any) -> str:
    return value[:256] if isinstance(value, str) else ""


# -- one observation, v2 -----------------------------------------------------------------------

MAX_DEPLOYMENTS = 1000  # more deployments on one endpoint are not believed (the object is malformed)


@dataclass(frozen=True, slots=True)
class Deployment:
    """What the follower reads of one EndpointDeploymentSummary (a v2 endpoint's `deployments`)."""

    hardware: str  # the instance type id
    ready: int | None  # readyReplicas; 0 when STOPPED; None: not said (never guessed)
    min_replicas: int | None
    max_replicas: int | None
    state: str
    model: str


def deployments_of(endpoint: Mapping[str, Any]) -> list[Deployment]:
    """The deployments of a v2 Endpoint object (GET /v2/projects/{project}/endpoints/{id})."""
    items = endpoint.get("deployments")
    if not isinstance(items, list) or len(items) > MAX_DEPLOYMENTS:
        raise DedicatedError("the v2 endpoint object has no usable deployments list")
    out = []
    for d in items:
        if not isinstance(d, dict):
            raise DedicatedError("a deployment of the v2 endpoint object is not an object")
        auto = d.get("autoscaling")
        state = _text(d.get("state"))
        out.append(
            Deployment(
                hardware=_text(d.get("hardware")),
                ready=0 if state == V2_STOPPED else _count(d.get("readyReplicas")),
                min_replicas=_count(auto.get("minReplicas")) if isinstance(auto, dict) else None,
                max_replicas=_count(auto.get("maxReplicas")) if isinstance(auto, dict) else None,
                state=state,
                model=_text(d.get("modelId")) or _text(d.get("model")),
            )
        )
    return out


def _priced(ready: Mapping[str, int], prices: Mapping[str, Decimal]) -> int | None:
    """v2_minute_cost_pusd, or None when an instance type that runs replicas has no price."""
    if any(n and t not in prices for t, n in ready.items()):
        return None
    return v2_minute_cost_pusd(ready, prices)


def _summed(deps: Sequence[Deployment], count: Callable[[Deployment], int | None]) -> dict[str, int] | None:
    """Replicas per instance type by `count`; None when a deployment's count is None."""
    out: dict[str, int] = {}
    for d in deps:
        n = count(d)
        if n is None:
            return None
        out[d.hardware] = out.get(d.hardware, 0) + n
    return out


def _total(deps: Sequence[Deployment], count: Callable[[Deployment], int | None]) -> int | None:
    by_type = _summed(deps, count)
    return None if by_type is None else sum(by_type.values())


def observe_v2(
    endpoint: Mapping[str, Any],
    prices: Mapping[str, Decimal],
    minute: int,
    observed_us: int,
    periods: Periods,
) -> EndpointMinute:
    """The endpoint-minute a v2 Endpoint object describes: ready replicas summed per instance type,
    priced per replica-hour (`prices`: cents per hour); DedicatedError if malformed.

    A deployment that does not say its readyReplicas (and is not STOPPED) makes the minute
    unknown (NULL cost, never guessed), bounded by 0 and its autoscaling maxReplicas.
    """
    endpoint_id = endpoint.get("id")
    if not isinstance(endpoint_id, str) or not endpoint_id:
        raise DedicatedError("the endpoint object has no id")
    kind = endpoint.get("endpointType", V2_DEDICATED)
    if kind != V2_DEDICATED:
        raise DedicatedError(f"a {kind!r} endpoint, not a dedicated one: not billed by the minute")
    deps = deployments_of(endpoint)
    ready = _summed(deps, lambda d: d.ready)
    if ready is not None:
        cost = low = high = _priced(ready, prices)
    else:
        cost = None
        low_by = _summed(deps, lambda d: 0 if d.ready is None else d.ready)
        high_by = _summed(deps, lambda d: d.max_replicas if d.ready is None else d.ready)
        low = None if low_by is None else _priced(low_by, prices)
        high = None if high_by is None else _priced(high_by, prices)
    types = sorted({d.hardware for d in deps if d.hardware})
    return EndpointMinute(
        endpoint_id=endpoint_id,
        minute_start=minute,
        period=periods.of(minute),
        name=_text(endpoint.get("name")),
        model=next((d.model for d in deps if d.model), ""),
        hardware=_text("+".join(types)),
        state=_text("+".join(sorted({d.state for d in deps}))) or "NO_DEPLOYMENTS",
        replicas=None if ready is None else sum(ready.values()),
        min_replicas=_total(deps, lambda d: d.min_replicas),
        max_replicas=_total(deps, lambda d: d.max_replicas),
        cents_per_minute=None,
        cost_pusd=cost,
        cost_low_pusd=low,
        cost_high_pusd=high,
        observed_us=observed_us,
        cents_per_hour=prices.get(types[0]) if len(types) == 1 else None,
    )


def rank(m: EndpointMinute | Mapping[str, Any]) -> tuple[bool, int, int, int, int]:
    """The order two observations of one minute are kept in (the larger stays): a known replica
    count over an unknown one, then more replicas, then the higher cost, then the wider bounds.

    A replica that ran in any part of the minute is billed for it, so the ledger errs towards
    the bill; and the result does not depend on which observation was written first.
    """
    get = m.get if isinstance(m, Mapping) else lambda name: getattr(m, name)
    replicas = get("replicas")
    return (
        replicas is not None,
        -1 if replicas is None else int(replicas),
        _or_minus(get("cost_pusd")),
        _or_minus(get("cost_high_pusd")),
        _or_minus(get("cost_low_pusd")),
    )


def _or_minus(value: Any) -> int:
    return -1 if value is None else int(value)


def better(new: EndpointMinute, old: EndpointMinute | Mapping[str, Any] | None) -> bool:
    """Should `new` replace what the ledger holds for its minute (None: nothing yet)?"""
    return old is None or rank(new) > rank(old)


# -- a month of minutes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MinutesLine:
    """The sums of one endpoint's minutes in a period at one (name, model, hardware, price)."""

    endpoint_id: str
    name: str
    model: str
    hardware: str
    cents_per_minute: Decimal | None
    minutes: int  # minutes observed
    known_minutes: int  # minutes whose cost is known
    replica_minutes: int  # sum of the known replica counts
    cost_pusd: int  # sum over the known minutes
    unknown_low_pusd: int  # sum of the lower bounds of the unknown minutes
    unknown_high_pusd: int | None  # ... of their upper bounds (None: some have none)
    first_minute: int
    last_minute: int
    cents_per_hour: Decimal | None = None  # v2: the price per replica-hour (None: v1, or mixed types)


@dataclass(frozen=True, slots=True)
class MeasuredEndpoint:
    """One endpoint's period as the ledger measured it."""

    endpoint_id: str
    name: str
    model: str
    hardware: tuple[str, ...]
    prices: tuple[Decimal, ...]  # distinct cents per minute seen
    minutes: int
    known_minutes: int
    replica_minutes: int
    cost_pusd: int  # the measured cost: the known minutes only
    unknown_low_pusd: int
    unknown_high_pusd: int | None
    first_minute: int
    last_minute: int
    unobserved_minutes: int  # minutes between the first and the last observed that were not
    prices_per_hour: tuple[Decimal, ...] = ()  # v2: distinct cents per replica-hour seen

    @property
    def unknown_minutes(self) -> int:
        return self.minutes - self.known_minutes

    @property
    def basis(self) -> str:
        hw = ", ".join(self.hardware) or "unknown hardware"
        per = [f"{cents_text(c)} cents/min" for c in self.prices]
        per += [f"{cents_text(c)} cents/hour" for c in self.prices_per_hour]
        cents = ", ".join(per) or "an unknown price"
        text = f"measured: {self.replica_minutes:,} replica-minutes of {hw} at {cents}"
        text += f" over {self.minutes:,} observed minute(s)"
        if self.unknown_minutes:
            hi = "?" if self.unknown_high_pusd is None else format_usd(self.unknown_high_pusd)
            text += (
                f"; {self.unknown_minutes:,} minute(s) with an unknown replica count "
                f"(${format_usd(self.unknown_low_pusd)}..${hi}, not charged)"
            )
        if self.unobserved_minutes:
            text += f"; {self.unobserved_minutes:,} minute(s) not observed (not charged)"
        return text


def measured(lines: Iterable[MinutesLine], minute_us: int = MINUTE_US) -> list[MeasuredEndpoint]:
    """The ledger's lines merged per endpoint (sorted by endpoint id), gaps counted."""
    by_id: dict[str, list[MinutesLine]] = {}
    for line in lines:
        by_id.setdefault(line.endpoint_id, []).append(line)
    out = []
    for endpoint_id in sorted(by_id):
        group = by_id[endpoint_id]
        last = max(group, key=lambda x: x.last_minute)  # its names as most recently seen
        first_minute = min(x.first_minute for x in group)
        last_minute = last.last_minute
        minutes = sum(x.minutes for x in group)
        span = (last_minute - first_minute) // minute_us + 1
        highs = [x.unknown_high_pusd for x in group]
        out.append(
            MeasuredEndpoint(
                endpoint_id=endpoint_id,
                name=last.name,
                model=last.model,
                hardware=tuple(sorted({x.hardware for x in group if x.hardware})),
                prices=tuple(sorted({x.cents_per_minute for x in group if x.cents_per_minute is not None})),
                minutes=minutes,
                known_minutes=sum(x.known_minutes for x in group),
                replica_minutes=sum(x.replica_minutes for x in group),
                cost_pusd=sum(x.cost_pusd for x in group),
                unknown_low_pusd=sum(x.unknown_low_pusd for x in group),
                unknown_high_pusd=None if None in highs else sum(h or 0 for h in highs),
                first_minute=first_minute,
                last_minute=last_minute,
                unobserved_minutes=max(span - minutes, 0),
                prices_per_hour=tuple(
                    sorted({x.cents_per_hour for x in group if x.cents_per_hour is not None})
                ),
            )
        )
    return out


# -- chargeback and comparison -----------------------------------------------------------------


def spread(total_pusd: int, tokens: Mapping[str, int]) -> dict[str, int]:
    """`total_pusd` over tenants by token share, whole pico-USD, adding up to it exactly.

    Each part is floored, then the pico-USD left over go one each to the tenants with the largest
    remainders, ties to the first tenant by name (chargeback.split_by_share). All shares 0: all 0.
    """
    names = sorted(tokens)
    return dict(zip(names, split_by_share(total_pusd, [tokens[n] for n in names]), strict=True))


@dataclass(frozen=True, slots=True)
class SameTokens:
    """What the tokens a dedicated endpoint served would have cost elsewhere."""

    model: str  # whose rates
    input_tokens: int
    output_tokens: int
    serverless_pusd: int | None  # None: the model has no price
    batch_pusd: int | None


def same_tokens(model: str, input_tokens: int, output_tokens: int, prices: PriceTable) -> SameTokens:
    """The endpoint's tokens at `model`'s Serverless and Batch rates (every input token at the
    input rate: cached discounts left out, an upper bound as in estimates)."""
    rates: Rates | None = prices.get(model)
    if rates is None:
        return SameTokens(model, input_tokens, output_tokens, None, None)
    return SameTokens(
        model,
        input_tokens,
        output_tokens,
        input_tokens * rates.input + output_tokens * rates.output,
        input_tokens * rates.batch_input + output_tokens * rates.batch_output,
    )


@dataclass(frozen=True, slots=True)
class DedicatedCharge:
    """A dedicated endpoint's period charged back: measured when minutes were, else configured."""

    chargeback: Chargeback
    source: str  # "measured" | "configured" | "none" (no minutes and no configured figure)
    endpoint_id: str | None
    measured: MeasuredEndpoint | None
    same: SameTokens


def _tokens(cb: Chargeback) -> tuple[int, int]:
    return sum(x.input_tokens for x in cb.lines), sum(x.output_tokens for x in cb.lines)


def dedicated_charges(
    rollups: Sequence[Rollup],
    period: str,
    configured: Sequence[DedicatedEndpoint],
    endpoints: Sequence[MeasuredEndpoint],
    prices: PriceTable,
) -> list[DedicatedCharge]:
    """Every dedicated endpoint's chargeback for `period`.

    A configured endpoint linked to a followed one (its `endpoint_id`, or a `model` that is the
    followed endpoint's name) with minutes in the period is charged its measured cost (the known
    minutes), else its configured figure (labelled so). A followed endpoint nothing links to is
    charged by the rows whose model is its name (what inference requests send to reach it), under
    its id. Tokens are spread as in chargeback.chargeback.
    """
    by_id = {e.endpoint_id: e for e in endpoints}
    by_name = {e.name: e for e in endpoints if e.name}
    out: list[DedicatedCharge] = []
    linked: set[str] = set()
    for cfg in configured:
        # linked by endpoint_id; or named by the endpoint's name (the rows it charges are the same
        # ones, so the endpoint must not be charged a second time under its id)
        m = by_id.get(cfg.endpoint_id) if cfg.endpoint_id else by_name.get(cfg.model)
        if m is not None:
            linked.add(m.endpoint_id)
        if cfg.endpoint_id:
            linked.add(cfg.endpoint_id)
        if m is not None:
            cb = chargeback(rollups, period, cfg.name, cfg.model, m.cost_pusd, m.basis)
            source = "measured"
        elif cfg.configured:
            basis = cfg.basis + (" (configured: no measured minutes)" if cfg.endpoint_id else "")
            cb = chargeback(rollups, period, cfg.name, cfg.model, cfg.monthly_pusd, basis)
            source = "configured"
        else:
            cb = chargeback(
                rollups, period, cfg.name, cfg.model, 0, "no measured minutes, no configured cost"
            )
            source = "none"
        out.append(
            DedicatedCharge(cb, source, cfg.endpoint_id, m, same_tokens(cfg.model, *_tokens(cb), prices))
        )
    for m in endpoints:
        if m.endpoint_id in linked:
            continue
        cb = chargeback(rollups, period, m.endpoint_id, m.name, m.cost_pusd, m.basis)
        out.append(
            DedicatedCharge(cb, "measured", m.endpoint_id, m, same_tokens(m.model, *_tokens(cb), prices))
        )
    return out


def _usd(pusd: int | None) -> str | None:
    return None if pusd is None else format_usd(pusd)


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


def measured_view(m: MeasuredEndpoint, minute_us: int = MINUTE_US) -> dict[str, Any]:
    """A measured endpoint-period as JSON-able values (money as exact decimal strings)."""
    return {
        "endpoint_id": m.endpoint_id,
        "name": m.name,
        "model": m.model,
        "hardware": list(m.hardware),
        "cents_per_minute": [cents_text(c) for c in m.prices],
        "cents_per_hour": [cents_text(c) for c in m.prices_per_hour],
        "minutes_observed": m.minutes,
        "replica_minutes": m.replica_minutes,
        "cost_usd": format_usd(m.cost_pusd),
        "minutes_unknown_replicas": m.unknown_minutes,
        "unknown_low_usd": format_usd(m.unknown_low_pusd),
        "unknown_high_usd": _usd(m.unknown_high_pusd),
        "minutes_not_observed": m.unobserved_minutes,
        "first_minute_us": m.first_minute,
        "last_minute_us": m.last_minute,
        "minute_seconds": _dec(Decimal(minute_us) / 1_000_000),
    }


def comparison_view(cost_pusd: int, same: SameTokens) -> dict[str, Any]:
    """The endpoint's cost against the same tokens on Serverless and Batch; effective rates."""
    tokens = same.input_tokens + same.output_tokens
    cheapest = None
    if same.serverless_pusd is not None and same.batch_pusd is not None:
        options = {"dedicated": cost_pusd, "serverless": same.serverless_pusd, "batch": same.batch_pusd}
        cheapest = min(options, key=lambda k: (options[k], k != "dedicated"))
    return {
        "rates_of": same.model,
        "input_tokens": same.input_tokens,
        "output_tokens": same.output_tokens,
        "tokens": tokens,
        "dedicated_usd": format_usd(cost_pusd),
        "dedicated_usd_per_mtok": _dec(per_mtok(cost_pusd, tokens)),
        "serverless_usd": _usd(same.serverless_pusd),
        "serverless_usd_per_mtok": _dec(
            None if same.serverless_pusd is None else per_mtok(same.serverless_pusd, tokens)
        ),
        "batch_usd": _usd(same.batch_pusd),
        "batch_usd_per_mtok": _dec(None if same.batch_pusd is None else per_mtok(same.batch_pusd, tokens)),
        "cheapest": cheapest,
        "break_even_tokens": break_even(cost_pusd, same),
    }


def break_even(cost_pusd: int, same: SameTokens) -> int | None:
    """Tokens (at this input/output mix) whose Serverless cost equals `cost_pusd`, rounded up."""
    tokens = same.input_tokens + same.output_tokens
    if same.serverless_pusd is None or tokens == 0 or same.serverless_pusd == 0:
        return None
    q = Fraction(cost_pusd * tokens, same.serverless_pusd)
    return -(-q.numerator // q.denominator)


def charge_view(dc: DedicatedCharge, tenant: str | None = None, minute_us: int = MINUTE_US) -> dict[str, Any]:
    """chargeback_view plus where the cost came from and what the same tokens cost elsewhere."""
    view = chargeback_view(dc.chargeback, tenant)
    view["source"] = dc.source
    view["endpoint_id"] = dc.endpoint_id
    view["measured"] = None if dc.measured is None else measured_view(dc.measured, minute_us)
    view["compare"] = comparison_view(dc.chargeback.monthly_pusd, dc.same)
    return view


def estimate_rows(charges: Sequence[DedicatedCharge], minute_us: int = MINUTE_US) -> list[dict[str, Any]]:
    """`estimate --measured-month`: each endpoint's cost against the same tokens elsewhere."""
    return [
        {
            "endpoint": dc.chargeback.endpoint,
            "endpoint_id": dc.endpoint_id,
            "model": dc.chargeback.model,
            "period": dc.chargeback.period,
            "source": dc.source,
            "basis": dc.chargeback.basis,
            "measured": None if dc.measured is None else measured_view(dc.measured, minute_us),
            "compare": comparison_view(dc.chargeback.monthly_pusd, dc.same),
        }
        for dc in charges
    ]


def parse_decimal_json(text: str | bytes) -> Any:
    """JSON with every non-integer number as an exact Decimal (prices keep their text)."""
    import json

    try:
        return json.loads(text, parse_float=Decimal)
    except (ValueError, InvalidOperation) as exc:
        raise DedicatedError(f"not JSON: {exc}") from None
