"""Price table and exact request cost.

Rates are configured in USD per 1M tokens, as together.ai publishes them. Internally a rate is an
integer number of pico-USD (1e-12 USD) per token, which is the same number as micro-USD per 1M
tokens: every rate with up to six decimals is represented exactly, and the cost of a request is an
integer sum of products, so nothing drifts however many requests are added up.

Usage semantics (OpenAI's, which together.ai follows): `cached_tokens` are a part of
`prompt_tokens`, and `reasoning_tokens` a part of `completion_tokens`. So a request costs

    (prompt - cached) x input + cached x cached_input + completion x output

and reasoning tokens are never priced on their own (they already are, inside `completion`).
Batch lines price their cached tokens at the batch input rate: together documents no cached rate
for batches (docs/batches.md).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from proxy.core.records import TOKEN
from proxy.core.usage import Usage
from proxy.errors import ConfigError

PUSD_PER_USD = 10**12
RATE_PLACES = 6  # decimals of USD per 1M tokens kept exactly
_RATE_QUANTUM = Decimal(1).scaleb(-RATE_PLACES)
SERVERLESS = "serverless"
BATCH = "batch"
# What the price table says about a model's batch rates (`Rates.batch`):
BATCH_DISCOUNT = "discount"  # `batch: {discount: 0.5}`: together takes that fraction off
BATCH_RATES = "rates"  # `batch_input` / `batch_output` set by hand
BATCH_NONE = "none"  # `batch: none`: together gives this model no batch discount
BATCH_UNKNOWN = "unknown"  # nothing known: batch lines at the serverless rates, and said so
_NO_GLOBAL_DISCOUNT = (
    "no longer applies to every model (together.ai discounts batches on selected models only): "
    "remove it and give each model `batch: {discount: 0.5}`, `batch: none` or `batch: unknown` "
    "(docs/configuration.md#price-table-pricesyaml)"
)


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
    batch: str = BATCH_RATES  # BATCH_DISCOUNT | BATCH_RATES | BATCH_NONE | BATCH_UNKNOWN
    batch_discount: Decimal | None = None  # the fraction taken off, with BATCH_DISCOUNT
    note: str | None = None
    unit: str = TOKEN  # what together bills the model by; not TOKEN: `per_unit` prices it
    per_unit: int | None = None  # pico-USD per unit (megapixel, image, second of audio or video)
    default_steps: int | None = None  # megapixel models: the steps a megapixel's price includes

    @property
    def by_token(self) -> bool:
        return self.unit == TOKEN

    def for_mode(self, mode: str) -> tuple[int, int]:
        """(input, output) rates of a mode: the batch rates in batch mode, else the serverless ones."""
        if mode == BATCH:
            return self.batch_input, self.batch_output
        return self.input, self.output

    def cached_rate(self, mode: str) -> int:
        """The rate of one cached prompt token: `cached_input` on serverless, else the mode's input rate."""
        if mode == SERVERLESS and self.cached_input is not None:
            return self.cached_input
        return self.for_mode(mode)[0]

    @property
    def batch_terms(self) -> str:
        """How batch lines of this model are priced, in words ('50 % off', 'no batch discount known')."""
        if self.batch == BATCH_DISCOUNT and self.batch_discount is not None:
            return f"{(self.batch_discount * 100).normalize():f} % off"
        return {
            BATCH_RATES: "batch rates set by hand",
            BATCH_NONE: "no batch discount",
            BATCH_UNKNOWN: "no batch discount known",
        }.get(self.batch, "no batch discount known")


def cached_part(usage: Usage) -> int:
    """The cached prompt tokens of a usage that are priced as cached: at most the whole prompt."""
    return min(usage.cached_tokens or 0, usage.prompt_tokens)


def cost_pusd(usage: Usage, rates: Rates, mode: str = SERVERLESS) -> int:
    """Exact cost in pico-USD: (prompt - cached) x input + cached x cached rate + completion x output."""
    rate_in, rate_out = rates.for_mode(mode)
    cached = cached_part(usage)
    return (
        (usage.prompt_tokens - cached) * rate_in
        + cached * rates.cached_rate(mode)
        + usage.completion_tokens * rate_out
    )


def unit_cost_pusd(quantity_micros: int, rates: Rates) -> int | None:
    """Exact cost of a quantity (millionths of the model's unit) at its per-unit price, rounded
    half-up to the pico-dollar; None when the model has no per-unit price."""
    if rates.per_unit is None:
        return None
    whole, rest = divmod(quantity_micros * rates.per_unit, 1_000_000)
    return whole + (1 if rest * 2 >= 1_000_000 else 0)


def cache_savings_pusd(cached_tokens: int, rates: Rates | None, mode: str) -> int:
    """What caching saved on `cached_tokens` cached prompt tokens: cached x (input - cached rate)."""
    if rates is None or cached_tokens <= 0:
        return 0
    return cached_tokens * (rates.for_mode(mode)[0] - rates.cached_rate(mode))


def usd(pusd: int) -> Decimal:
    """Pico-USD as an exact Decimal number of USD."""
    return Decimal(pusd).scaleb(-12)


def format_usd(pusd: int, places: int | None = None) -> str:
    """Exact decimal string of a pico-USD amount ('0.006'); rounded half-up to `places` if given."""
    if places is not None:
        return str(usd(pusd).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))
    # integer arithmetic (every request formats its cost): the digits of Decimal's normalized
    # fixed-point form, without building a Decimal
    whole, frac = divmod(-pusd if pusd < 0 else pusd, PUSD_PER_USD)
    text = f"{whole}.{frac:012d}".rstrip("0") if frac else str(whole)
    return "-" + text if pusd < 0 else text


def _decimal(value: Any, file: str, key: str, what: str) -> Decimal:
    """A finite, non-negative Decimal from a YAML number or string (floats through their repr)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigError(file, key, f"must be {what}, got {value!r}")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(file, key, f"must be {what}, got {value!r}") from None
    if not dec.is_finite() or dec < 0:
        raise ConfigError(file, key, f"must be a finite number >= 0, got {value!r}")
    return dec


def rate_to_pusd(value: Any, *, file: str = "<prices>", key: str = "") -> int:
    """USD per 1M tokens (number or string) -> pico-USD per token, exactly, or ConfigError."""
    dec = _decimal(value, file, key, "a number of USD per 1M tokens")
    try:
        exact = dec == dec.quantize(_RATE_QUANTUM)
    except InvalidOperation:
        raise ConfigError(file, key, f"is too large, got {value!r}") from None
    if not exact:
        raise ConfigError(file, key, f"at most {RATE_PLACES} decimals are supported, got {value!r}")
    return int(dec.scaleb(RATE_PLACES))


def unit_price_to_pusd(value: Any, *, file: str = "<prices>", key: str = "") -> int:
    """USD per unit (number or string, up to 12 decimals) -> pico-USD per unit, exactly."""
    dec = _decimal(value, file, key, "a number of USD per unit")
    try:
        exact = dec == dec.quantize(Decimal(1).scaleb(-12))
    except InvalidOperation:
        raise ConfigError(file, key, f"is too large, got {value!r}") from None
    if not exact:
        raise ConfigError(file, key, f"at most 12 decimals (pico-USD) are supported, got {value!r}")
    return int(dec.scaleb(12))


def pusd_rate_to_decimal(rate: int) -> Decimal:
    """Pico-USD per token back to USD per 1M tokens."""
    return Decimal(rate).scaleb(-RATE_PLACES).normalize()


def discounted(rate: int, factor: Decimal) -> int:
    """A rate times a factor (the fraction paid), rounded half-up to the rate quantum."""
    return int((Decimal(rate) * factor).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def batch_rate(rate: int, basis: str, discount: Decimal | None) -> int:
    """The batch rate that follows from a serverless rate: `discount` off it, or the rate itself."""
    if basis == BATCH_DISCOUNT and discount is not None:
        return discounted(rate, 1 - discount)
    return rate


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Model id -> Rates, plus where it came from."""

    models: Mapping[str, Rates]
    source: str = "<built-in>"
    extra: Mapping[str, Any] = field(default_factory=dict)
    header: tuple[str, ...] = ()  # the file's leading comment lines, kept by `prices sync`

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
    if "batch_discount" in data:
        raise ConfigError(file, "batch_discount", _NO_GLOBAL_DISCOUNT)
    models_raw = data.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise ConfigError(file, "models", "must be a non-empty mapping of model id -> rates")
    models = {model_id: parse_model(model_id, spec, file) for model_id, spec in models_raw.items()}
    extra = {k: data[k] for k in ("synced_at", "source") if k in data}
    return PriceTable(models, file, extra)


_MODEL_KEYS = frozenset(
    {
        "input",
        "output",
        "cached_input",
        "batch",
        "batch_input",
        "batch_output",
        "context_length",
        "read",
        "type",
        "note",
        "unit",
        "per_unit",
        "default_steps",
    }
)
UNITS = ("megapixel", "image", "audio_second", "video_second")  # besides TOKEN


def parse_model(model_id: Any, spec: Any, file: str) -> Rates:
    """One model's entry of a prices file as Rates; errors name `models.<id>.<key>`."""
    key = f"models.{model_id}"
    if not isinstance(model_id, str) or not model_id.strip():
        raise ConfigError(file, key, "model id must be a non-empty string")
    if not isinstance(spec, dict):
        raise ConfigError(file, key, "must be a mapping with 'input' and 'output'")
    bad = set(spec) - _MODEL_KEYS
    if bad:
        raise ConfigError(file, f"{key}.{sorted(map(str, bad))[0]}", "unknown key")
    if spec.get("unit", TOKEN) != TOKEN:
        return _parse_unit_model(spec, file, key)
    for unit_key in ("per_unit", "default_steps"):
        if unit_key in spec:
            raise ConfigError(
                file, f"{key}.{unit_key}", "only for a model priced per unit (`unit: megapixel`, ...)"
            )
    for required in ("input", "output"):
        if required not in spec:
            raise ConfigError(file, f"{key}.{required}", "missing (USD per 1M tokens)")
    rin = rate_to_pusd(spec["input"], file=file, key=f"{key}.input")
    rout = rate_to_pusd(spec["output"], file=file, key=f"{key}.output")
    cached = _cached_rate(spec, rin, file, key)
    basis, discount, bin_, bout = _batch(spec, rin, rout, file, key)
    ctx, read, note = _informational(spec, file, key)
    return Rates(rin, rout, bin_, bout, cached, ctx, read, spec.get("type"), basis, discount, note)


def _parse_unit_model(spec: dict[str, Any], file: str, key: str) -> Rates:
    """A model together bills per megapixel, image or second of audio or video."""
    unit = spec["unit"]
    if unit not in UNITS:
        raise ConfigError(file, f"{key}.unit", f"must be {TOKEN} or one of {', '.join(UNITS)}, got {unit!r}")
    for token_key in ("input", "output", "cached_input", "batch_input", "batch_output"):
        if token_key in spec:
            raise ConfigError(
                file, f"{key}.{token_key}", f"a model priced per {unit} has `per_unit`, not token rates"
            )
    if "per_unit" not in spec:
        raise ConfigError(file, f"{key}.per_unit", f"missing (USD per {unit})")
    per_unit = unit_price_to_pusd(spec["per_unit"], file=file, key=f"{key}.per_unit")
    steps = spec.get("default_steps")
    if steps is not None and (
        unit != "megapixel" or isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
    ):
        raise ConfigError(
            file, f"{key}.default_steps", "a positive integer, for a model priced per megapixel"
        )
    if spec.get("batch", BATCH_NONE) != BATCH_NONE:
        raise ConfigError(file, f"{key}.batch", "together's batch API runs chat completions only: `none`")
    _, read, note = _informational(spec, file, key)
    return Rates(
        0, 0, 0, 0, None, None, read, spec.get("type"), BATCH_NONE, None, note, unit, per_unit, steps
    )


def _cached_rate(spec: dict[str, Any], rin: int, file: str, key: str) -> int | None:
    if spec.get("cached_input") is None:
        return None
    cached = rate_to_pusd(spec["cached_input"], file=file, key=f"{key}.cached_input")
    if cached > rin:
        raise ConfigError(
            file, f"{key}.cached_input", "must not be above `input` (a cache hit is a discount)"
        )
    return cached


def _batch(
    spec: dict[str, Any], rin: int, rout: int, file: str, key: str
) -> tuple[str, Decimal | None, int, int]:
    """The batch basis, its discount and the batch input and output rates of one model."""
    explicit = [k for k in ("batch_input", "batch_output") if k in spec]
    raw = spec.get("batch")
    basis, discount = _batch_basis(raw, file, f"{key}.batch")
    if explicit and basis in (BATCH_NONE, BATCH_UNKNOWN) and raw is not None:
        raise ConfigError(file, f"{key}.{explicit[0]}", f"contradicts `batch: {basis}`")
    if explicit and basis == BATCH_UNKNOWN:
        basis = BATCH_RATES
    rates = []
    for name, serverless in (("batch_input", rin), ("batch_output", rout)):
        given = spec.get(name)
        follows = batch_rate(serverless, basis, discount)
        rates.append(follows if given is None else rate_to_pusd(given, file=file, key=f"{key}.{name}"))
    return basis, discount, rates[0], rates[1]


def _batch_basis(raw: Any, file: str, key: str) -> tuple[str, Decimal | None]:
    """`batch`: absent or `unknown`, `none`, or `{discount: d}` (d: the fraction together takes off)."""
    if raw is None or raw == BATCH_UNKNOWN:
        return BATCH_UNKNOWN, None
    if raw == BATCH_NONE:
        return BATCH_NONE, None
    if isinstance(raw, dict) and set(raw) == {"discount"}:
        discount = _decimal(raw["discount"], file, f"{key}.discount", "a fraction between 0 and 1")
        if discount > 1:
            raise ConfigError(
                file, f"{key}.discount", f"must be between 0 and 1 (0.5 = 50 % off), got {discount}"
            )
        return BATCH_DISCOUNT, discount
    raise ConfigError(file, key, "must be `none`, `unknown` or `{discount: 0.5}` (the fraction taken off)")


def _informational(spec: dict[str, Any], file: str, key: str) -> tuple[int | None, str | None, str | None]:
    """context_length, read and note of one model (not used in any cost)."""
    ctx = spec.get("context_length")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0):
        raise ConfigError(file, f"{key}.context_length", f"must be a positive integer, got {ctx!r}")
    read = spec.get("read")
    if isinstance(read, dt.date):
        read = read.isoformat()
    note = spec.get("note")
    if note is not None and not isinstance(note, str):
        raise ConfigError(file, f"{key}.note", f"must be a string, got {note!r}")
    return ctx, None if read is None else str(read), note
