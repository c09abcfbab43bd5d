"""Price table and exact request cost.

Rates are configured in USD per 1M tokens, as together.ai publishes them. Internally a rate is an
integer number of pico-USD (1e-12 USD) per token, which is the same number as micro-USD per 1M
tokens: every rate with up to six decimals is represented exactly, and the cost of a request is an
integer sum of products, so nothing drifts however many requests are added up.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from proxy.core.usage import Usage
from proxy.errors import ConfigError

PUSD_PER_USD = 10**12
RATE_PLACES = 6  # decimals of USD per 1M tokens kept exactly
_RATE_QUANTUM = Decimal(1).scaleb(-RATE_PLACES)
SERVERLESS = "serverless"
BATCH = "batch"


@dataclass(frozen=True, slots=True)
class Rates:
    """One model's rates, in pico-USD per token (== micro-USD per 1M tokens)."""

    input: int
    output: int
    batch_input: int
    batch_output: int
    cached_input: int | None = None
    context_length: int | None = None
    read: str | None = None
    type: str | None = None

    def for_mode(self, mode: str) -> tuple[int, int]:
        if mode == BATCH:
            return self.batch_input, self.batch_output
        return self.input, self.output


def cost_pusd(usage: Usage, rates: Rates, mode: str = SERVERLESS) -> int:
    """Exact cost of one request in pico-USD: T_in × P_in + T_out × P_out."""
    rate_in, rate_out = rates.for_mode(mode)
    prompt = usage.prompt_tokens
    cost = 0
    if rates.cached_input is not None and usage.cached_tokens and mode == SERVERLESS:
        cached = min(usage.cached_tokens, prompt)
        cost += cached * rates.cached_input
        prompt -= cached
    return cost + prompt * rate_in + usage.completion_tokens * rate_out


def usd(pusd: int) -> Decimal:
    """Pico-USD as an exact Decimal number of USD."""
    return Decimal(pusd).scaleb(-12)


def format_usd(pusd: int, places: int | None = None) -> str:
    """Exact decimal string of a pico-USD amount ('0.006'); rounded half-up to `places` if given."""
    value = usd(pusd)
    if places is not None:
        return str(value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))
    return format(value.normalize(), "f")


def rate_to_pusd(value: Any, *, file: str = "<prices>", key: str = "") -> int:
    """USD per 1M tokens (number or string) -> pico-USD per token, exactly, or ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigError(file, key, f"must be a number of USD per 1M tokens, got {value!r}")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(file, key, f"must be a number of USD per 1M tokens, got {value!r}") from None
    if not dec.is_finite() or dec < 0:
        raise ConfigError(file, key, f"must be a finite number >= 0, got {value!r}")
    try:
        exact = dec == dec.quantize(_RATE_QUANTUM)
    except InvalidOperation:
        raise ConfigError(file, key, f"is too large, got {value!r}") from None
    if not exact:
        raise ConfigError(file, key, f"at most {RATE_PLACES} decimals are supported, got {value!r}")
    return int(dec.scaleb(RATE_PLACES))


def pusd_rate_to_decimal(rate: int) -> Decimal:
    """Pico-USD per token back to USD per 1M tokens."""
    return Decimal(rate).scaleb(-RATE_PLACES).normalize()


def discounted(rate: int, factor: Decimal) -> int:
    """A rate times a discount factor, rounded half-up to the rate quantum."""
    return int((Decimal(rate) * factor).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Model id -> Rates, plus where it came from."""

    models: Mapping[str, Rates]
    batch_discount: Decimal = Decimal("0.5")
    source: str = "<built-in>"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def get(self, model: str) -> Rates | None:
        return self.models.get(model)

    def __contains__(self, model: object) -> bool:
        return model in self.models

    def __len__(self) -> int:
        return len(self.models)


def parse_price_table(data: Any, file: str) -> PriceTable:
    """Build a PriceTable from the parsed YAML of a prices file; errors name file and key."""
    if not isinstance(data, dict):
        raise ConfigError(file, "", "must be a mapping with a 'models' key")
    unknown = set(data) - {"models", "batch_discount", "currency", "unit", "synced_at", "source"}
    if unknown:
        raise ConfigError(file, sorted(map(str, unknown))[0], "unknown key")
    discount_raw = data.get("batch_discount", "0.5")
    try:
        discount = Decimal(str(discount_raw))
    except InvalidOperation:
        raise ConfigError(file, "batch_discount", f"must be a number, got {discount_raw!r}") from None
    if not discount.is_finite() or not (Decimal(0) <= discount <= Decimal(1)):
        raise ConfigError(file, "batch_discount", "must be between 0 and 1 (0.5 = half price)")
    models_raw = data.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise ConfigError(file, "models", "must be a non-empty mapping of model id -> rates")
    models: dict[str, Rates] = {}
    for model_id, spec in models_raw.items():
        key = f"models.{model_id}"
        if not isinstance(model_id, str) or not model_id.strip():
            raise ConfigError(file, key, "model id must be a non-empty string")
        if not isinstance(spec, dict):
            raise ConfigError(file, key, "must be a mapping with 'input' and 'output'")
        allowed = {
            "input",
            "output",
            "batch_input",
            "batch_output",
            "cached_input",
            "context_length",
            "read",
            "type",
        }
        bad = set(spec) - allowed
        if bad:
            raise ConfigError(file, f"{key}.{sorted(map(str, bad))[0]}", "unknown key")
        for required in ("input", "output"):
            if required not in spec:
                raise ConfigError(file, f"{key}.{required}", "missing (USD per 1M tokens)")
        rin = rate_to_pusd(spec["input"], file=file, key=f"{key}.input")
        rout = rate_to_pusd(spec["output"], file=file, key=f"{key}.output")
        bin_ = (
            rate_to_pusd(spec["batch_input"], file=file, key=f"{key}.batch_input")
            if "batch_input" in spec
            else discounted(rin, discount)
        )
        bout = (
            rate_to_pusd(spec["batch_output"], file=file, key=f"{key}.batch_output")
            if "batch_output" in spec
            else discounted(rout, discount)
        )
        cached = (
            rate_to_pusd(spec["cached_input"], file=file, key=f"{key}.cached_input")
            if spec.get("cached_input") is not None
            else None
        )
        ctx = spec.get("context_length")
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0):
            raise ConfigError(file, f"{key}.context_length", f"must be a positive integer, got {ctx!r}")
        read = spec.get("read")
        if isinstance(read, dt.date):
            read = read.isoformat()
        models[model_id] = Rates(
            rin, rout, bin_, bout, cached, ctx, None if read is None else str(read), spec.get("type")
        )
    extra = {k: data[k] for k in ("synced_at", "source") if k in data}
    return PriceTable(models, discount, file, extra)
