"""proxy/core/pricing.py: exact rates, exact request cost, price table parsing and dumping."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.prices import dump_price_table, load_price_table
from proxy.core.pricing import (
    BATCH,
    BATCH_DISCOUNT,
    BATCH_NONE,
    BATCH_RATES,
    BATCH_UNKNOWN,
    PUSD_PER_USD,
    SERVERLESS,
    PriceTable,
    Rates,
    batch_rate,
    cache_savings_pusd,
    cost_pusd,
    format_usd,
    parse_price_table,
    rate_to_pusd,
    unit_price_to_pusd,
    usd,
)
from proxy.core.usage import Usage, usage_from_json
from proxy.errors import ConfigError

PRICES_YAML = Path(__file__).resolve().parent.parent / "config" / "prices.yaml"
SEED_MODEL = "example/seed-model"
SEED_USAGE = Usage(prompt_tokens=3_000, completion_tokens=1_000)


def seed_table(**extra: object) -> PriceTable:
    """The DESIGN seed example as a parsed price table: $0.90 in, $3.30 out per 1M tokens."""
    spec = {"input": 0.90, "output": 3.30, **extra}
    return parse_price_table({"models": {SEED_MODEL: spec}}, "seed.yaml")


def seed_rates(**extra: object) -> Rates:
    rates = seed_table(**extra).get(SEED_MODEL)
    assert rates is not None
    return rates


# -- the seed example ---------------------------------------------------------------------------


def test_seed_request_costs_exactly_six_tenths_of_a_cent() -> None:
    """3,000 in + 1,000 out at $0.90/$3.30 per 1M is exactly $0.0060."""
    cost = cost_pusd(SEED_USAGE, seed_rates())
    assert cost == 6_000_000_000
    assert usd(cost) == Decimal("0.0060")
    assert format_usd(cost) == "0.006"


def test_two_million_seed_requests_cost_exactly_12000_usd() -> None:
    """2,000,000 seed requests (a month of the DESIGN example) cost exactly $12,000."""
    total = cost_pusd(SEED_USAGE, seed_rates()) * 2_000_000
    assert usd(total) == Decimal(12_000)
    assert format_usd(total) == "12000"


def test_batch_at_a_fifty_percent_discount_is_half_the_serverless_cost() -> None:
    """The seed at `batch: {discount: 0.5}` (Batch at 50 %): $6,000 per 2M requests."""
    rates = seed_rates(batch={"discount": 0.5})
    one = cost_pusd(SEED_USAGE, rates, BATCH)
    assert one * 2 == cost_pusd(SEED_USAGE, rates, SERVERLESS)
    assert usd(one * 2_000_000) == Decimal(6_000)


def test_format_usd_rounds_half_up_to_places() -> None:
    """format_usd with places rounds half-up and keeps trailing zeros."""
    assert format_usd(6_000_000_000, places=4) == "0.0060"
    assert format_usd(5 * 10**9, places=2) == "0.01"  # 0.005 -> 0.01, half-up
    assert format_usd(4_999_999_999, places=2) == "0.00"


# -- rate parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "usd_per_million"),
    [
        (0.88, "0.88"),
        (0.1, "0.1"),
        (3.3, "3.3"),
        (0.000001, "0.000001"),
        (1.234567, "1.234567"),
        (7, "7"),
        (0, "0"),
        ("0.88", "0.88"),
        (Decimal("12.5"), "12.5"),
    ],
)
def test_rates_from_yaml_numbers_are_exact(value: object, usd_per_million: str) -> None:
    """A YAML float like 0.88 becomes exactly 0.88 USD per 1M tokens, not its binary approximation."""
    rate = rate_to_pusd(value)
    # pico-USD per token x 1M tokens / 1e12 == USD per 1M tokens
    assert Decimal(rate) * 1_000_000 / PUSD_PER_USD == Decimal(usd_per_million)


def test_rate_parsed_from_yaml_text_is_exact() -> None:
    """Rates read by the YAML parser (floats) price a million tokens at exactly the written rate."""
    table = parse_price_table(yaml.safe_load("models: {m: {input: 0.88, output: 0.18}}"), "p.yaml")
    rates = table.get("m")
    assert rates is not None
    assert usd(cost_pusd(Usage(1_000_000, 0), rates)) == Decimal("0.88")
    assert usd(cost_pusd(Usage(0, 1_000_000), rates)) == Decimal("0.18")


@pytest.mark.parametrize("value", [0.1234567, "0.0000001", "1.1234567", Decimal("2.0000005")])
def test_more_than_six_decimals_is_rejected_naming_file_and_key(value: object) -> None:
    """A rate with more than 6 decimals cannot be priced exactly: ConfigError naming file and key."""
    with pytest.raises(ConfigError) as info:
        parse_price_table({"models": {"m": {"input": value, "output": 1}}}, "prices.yaml")
    assert info.value.file == "prices.yaml"
    assert info.value.key == "models.m.input"
    assert "decimals" in info.value.problem
    assert "prices.yaml" in str(info.value) and "models.m.input" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-0.1",
        True,
        False,
        "cheap",
        "",
        None,
        [1],
        {"usd": 1},
        float("nan"),
        float("inf"),
        "Infinity",
    ],
)
def test_garbage_rates_are_rejected_naming_file_and_key(value: object) -> None:
    """Negative, bool, non-numeric and non-finite rates raise ConfigError naming file and key."""
    with pytest.raises(ConfigError) as info:
        parse_price_table({"models": {"m": {"input": 1, "output": value}}}, "prices.yaml")
    assert (info.value.file, info.value.key) == ("prices.yaml", "models.m.output")


def test_absurdly_large_rate_is_a_config_error() -> None:
    """A rate too large to hold exactly (1e30 USD per 1M) is a ConfigError, not a decimal crash."""
    with pytest.raises(ConfigError) as info:
        parse_price_table({"models": {"m": {"input": 1e30, "output": 1}}}, "prices.yaml")
    assert info.value.key == "models.m.input"


@pytest.mark.parametrize("missing", ["input", "output"])
def test_missing_rate_is_rejected(missing: str) -> None:
    """Both input and output rates are required."""
    spec = {"input": 1, "output": 2}
    del spec[missing]
    with pytest.raises(ConfigError) as info:
        parse_price_table({"models": {"m": spec}}, "prices.yaml")
    assert info.value.key == f"models.m.{missing}"


# -- batch rates, per model -------------------------------------------------------------------


def test_a_model_without_batch_terms_is_priced_at_serverless_rates_in_batch() -> None:
    """No `batch` key: nothing known, so batch lines cost the serverless rates, and that is said."""
    rates = seed_rates()
    assert (rates.batch, rates.batch_input, rates.batch_output) == (BATCH_UNKNOWN, rates.input, rates.output)
    assert cost_pusd(SEED_USAGE, rates, BATCH) == cost_pusd(SEED_USAGE, rates, SERVERLESS)
    assert rates.batch_terms == "no batch discount known"


def test_batch_none_is_the_serverless_rate_and_says_so() -> None:
    """`batch: none` (together gives the model no discount): serverless rates, 'no batch discount'."""
    rates = seed_rates(batch="none")
    assert (rates.batch, rates.batch_input, rates.batch_output) == (BATCH_NONE, rates.input, rates.output)
    assert rates.batch_terms == "no batch discount"


def test_batch_discount_takes_that_fraction_off_each_rate() -> None:
    """`batch: {discount: 0.25}`: each batch rate is 75 % of its serverless rate, exactly."""
    rates = seed_rates(batch={"discount": "0.25"})
    assert rates.batch == BATCH_DISCOUNT and rates.batch_discount == Decimal("0.25")
    assert (rates.batch_input, rates.batch_output) == (rate_to_pusd("0.675"), rate_to_pusd("2.475"))
    assert rates.batch_terms == "25 % off"


def test_a_discounted_rate_rounds_half_up_to_six_decimals() -> None:
    """$0.000001 per 1M at 50 % off is $0.0000005: rounded half-up to the rate quantum."""
    table = parse_price_table(
        {"models": {"m": {"input": 0.000001, "output": 0.000003, "batch": {"discount": 0.5}}}}, "p"
    )
    rates = table.get("m")
    assert rates is not None and (rates.batch_input, rates.batch_output) == (1, 2)


def test_explicit_batch_rates_are_used_as_written() -> None:
    """Explicit batch rates are used as written, for batch mode only."""
    rates = seed_rates(batch_input=0.6, batch_output=2.2)
    assert rates.batch == BATCH_RATES and rates.batch_terms == "batch rates set by hand"
    assert usd(cost_pusd(SEED_USAGE, rates, BATCH)) == Decimal("0.0040")  # 3k*0.6 + 1k*2.2 per 1M
    assert usd(cost_pusd(SEED_USAGE, rates, SERVERLESS)) == Decimal("0.0060")


def test_one_explicit_batch_rate_leaves_the_other_at_its_basis() -> None:
    """batch_input alone: batch_output is the serverless rate, or the discounted one with a discount."""
    alone = seed_rates(batch_input=0.6)
    assert (alone.batch_input, alone.batch_output) == (rate_to_pusd("0.6"), rate_to_pusd("3.3"))
    with_discount = seed_rates(batch={"discount": 0.5}, batch_input=0.6)
    assert (with_discount.batch, with_discount.batch_output) == (BATCH_DISCOUNT, rate_to_pusd("1.65"))


def test_a_global_batch_discount_is_refused_with_the_way_to_migrate() -> None:
    """The old top-level batch_discount no longer silently applies to every model: a config error."""
    with pytest.raises(ConfigError) as info:
        parse_price_table({"batch_discount": 0.5, "models": {"m": {"input": 1, "output": 1}}}, "prices.yaml")
    assert info.value.key == "batch_discount"
    assert "batch: {discount: 0.5}" in info.value.problem and "selected models" in info.value.problem


@pytest.mark.parametrize(
    "batch",
    ["half", 0.5, True, {"discount": 1.5}, {"discount": -0.1}, {"discount": "x"}, {"rate": 0.5}, [0.5]],
)
def test_bad_batch_terms_are_a_config_error(batch: object) -> None:
    """`batch` is none, unknown or {discount: 0..1}; a bare number is ambiguous, so refused too."""
    with pytest.raises(ConfigError) as info:
        parse_price_table({"models": {"m": {"input": 1, "output": 1, "batch": batch}}}, "prices.yaml")
    assert info.value.key.startswith("models.m.batch")


@pytest.mark.parametrize("batch", ["none", "unknown"])
def test_batch_none_or_unknown_contradicts_explicit_batch_rates(batch: str) -> None:
    """`batch: none` with a batch_output set by hand is a contradiction, named."""
    with pytest.raises(ConfigError) as info:
        parse_price_table(
            {"models": {"m": {"input": 1, "output": 1, "batch": batch, "batch_output": 0.5}}}, "p"
        )
    assert info.value.key == "models.m.batch_output" and batch in info.value.problem


# -- cached input, with together's usage shapes ---------------------------------------------------

TOGETHER_CACHED = {  # usage.prompt_tokens_details.cached_tokens (the OpenAI shape)
    "prompt_tokens": 3_000,
    "completion_tokens": 1_000,
    "total_tokens": 4_000,
    "prompt_tokens_details": {"cached_tokens": 2_000},
}
TOGETHER_FLAT_CACHED = {
    "prompt_tokens": 3_000,
    "completion_tokens": 1_000,
    "total_tokens": 4_000,
    "cached_tokens": 2_000,
}
TOGETHER_REASONING = {  # reasoning tokens are a part of completion_tokens
    "prompt_tokens": 3_000,
    "completion_tokens": 1_000,
    "total_tokens": 4_000,
    "completion_tokens_details": {"reasoning_tokens": 600},
}


@pytest.mark.parametrize("shape", [TOGETHER_CACHED, TOGETHER_FLAT_CACHED], ids=["details", "flat"])
def test_cached_input_tokens_are_priced_at_the_cached_rate(shape: dict[str, object]) -> None:
    """(prompt - cached) x input + cached x cached_input + completion x output, either usage shape."""
    usage = usage_from_json(shape)
    assert usage is not None and usage.cached_tokens == 2_000
    # 1,000 x 0.90 + 2,000 x 0.45 + 1,000 x 3.30 per 1M = 0.0009 + 0.0009 + 0.0033
    assert cost_pusd(usage, seed_rates(cached_input=0.45)) == 5_100_000_000


def test_reasoning_tokens_are_never_priced_twice() -> None:
    """Reasoning tokens are inside completion_tokens: the cost is that of the bare counts."""
    usage = usage_from_json(TOGETHER_REASONING)
    assert usage is not None and usage.reasoning_tokens == 600
    assert cost_pusd(usage, seed_rates()) == cost_pusd(SEED_USAGE, seed_rates()) == 6_000_000_000


def test_cached_tokens_without_a_cached_rate_cost_the_full_input_rate() -> None:
    """A model without cached_input prices cached tokens as ordinary input."""
    usage = Usage(3_000, 1_000, cached_tokens=2_000)
    assert cost_pusd(usage, seed_rates()) == cost_pusd(SEED_USAGE, seed_rates())
    assert cache_savings_pusd(2_000, seed_rates(), SERVERLESS) == 0


def test_cached_tokens_are_never_more_than_the_prompt() -> None:
    """A cached count above the prompt count discounts at most the whole prompt."""
    rates = seed_rates(cached_input=0.45)
    over = cost_pusd(Usage(3_000, 1_000, cached_tokens=9_000), rates)
    assert over == cost_pusd(Usage(3_000, 1_000, cached_tokens=3_000), rates)


def test_batch_lines_price_cached_tokens_at_the_batch_input_rate() -> None:
    """together documents no cached rate for batches: a batch line's whole prompt is at batch input."""
    rates = seed_rates(cached_input=0.45, batch={"discount": 0.5})
    usage = Usage(3_000, 1_000, cached_tokens=2_000)
    assert cost_pusd(usage, rates, BATCH) == cost_pusd(SEED_USAGE, rates, BATCH) == 3_000_000_000
    assert cache_savings_pusd(2_000, rates, BATCH) == 0


def test_cache_savings_is_cached_tokens_times_the_rate_difference() -> None:
    """2,000 cached tokens at $0.45 instead of $0.90 per 1M saved exactly $0.0009."""
    rates = seed_rates(cached_input=0.45)
    assert usd(cache_savings_pusd(2_000, rates, SERVERLESS)) == Decimal("0.0009")
    assert cache_savings_pusd(2_000, None, SERVERLESS) == 0


def test_cached_input_above_input_is_a_config_error() -> None:
    """A cache hit is a discount: cached_input above input is refused, naming the key."""
    with pytest.raises(ConfigError) as info:
        seed_rates(cached_input=1.0)
    assert info.value.key == f"models.{SEED_MODEL}.cached_input"


def test_a_note_must_be_text() -> None:
    """`note` is free text kept by `prices sync`; anything else names the key."""
    assert seed_rates(note="together: 50 % off").note == "together: 50 % off"
    with pytest.raises(ConfigError) as info:
        seed_rates(note=3)
    assert info.value.key == f"models.{SEED_MODEL}.note"


# -- properties: exact arithmetic ---------------------------------------------------------------

rate_values = st.integers(min_value=0, max_value=1_000 * 10**6)  # 0 .. $1,000 per 1M, 6 decimals


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    prompt = draw(st.integers(0, 2_000_000))
    cached = draw(st.one_of(st.none(), st.integers(0, prompt)))
    return Usage(prompt, draw(st.integers(0, 2_000_000)), cached_tokens=cached)


@st.composite
def rates_strategy(draw: st.DrawFn) -> Rates:
    return Rates(
        draw(rate_values),
        draw(rate_values),
        draw(rate_values),
        draw(rate_values),
        draw(st.one_of(st.none(), rate_values)),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(usages(), min_size=1, max_size=30), rates_strategy(), st.sampled_from([SERVERLESS, BATCH]))
def test_cost_is_linear_in_usage(batch: list[Usage], rates: Rates, mode: str) -> None:
    """The sum of per-request costs equals the cost of the summed usage, exactly."""
    summed = Usage(
        sum(u.prompt_tokens for u in batch),
        sum(u.completion_tokens for u in batch),
        cached_tokens=sum(u.cached_tokens or 0 for u in batch),
    )
    assert sum(cost_pusd(u, rates, mode) for u in batch) == cost_pusd(summed, rates, mode)


@settings(max_examples=150, deadline=None)
@given(usages(), rates_strategy(), st.sampled_from([SERVERLESS, BATCH]))
def test_cost_plus_savings_is_the_cost_without_the_cache(usage: Usage, rates: Rates, mode: str) -> None:
    """What caching saved is exactly the difference to pricing the same prompt uncached."""
    uncached = Usage(usage.prompt_tokens, usage.completion_tokens)
    saved = cache_savings_pusd(usage.cached_tokens or 0, rates, mode)
    assert cost_pusd(usage, rates, mode) + saved == cost_pusd(uncached, rates, mode)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**24))
def test_format_usd_is_exact(pusd: int) -> None:
    """format_usd(x) parses back with Decimal to exactly x / 10**12 (up to $1e12)."""
    text = format_usd(pusd)
    assert "E" not in text.upper()
    assert Decimal(text) * PUSD_PER_USD == pusd


@settings(max_examples=500, deadline=None)
@given(
    st.integers(min_value=-(10**24), max_value=10**24)
    | st.sampled_from([0, 1, -1, 10**12, 10**14, -(10**13)])
)
def test_format_usd_is_the_normalized_decimal(pusd: int) -> None:
    """format_usd(x) is exactly Decimal's normalized fixed-point text of x / 10**12 (no trailing
    zeros, no exponent, the sign kept): the text the ledger, headers and bodies always carried."""
    assert format_usd(pusd) == format(Decimal(pusd).scaleb(-12).normalize(), "f")


# -- price table files --------------------------------------------------------------------------

model_ids = st.from_regex(r"[a-z][a-z0-9-]{0,12}/[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@st.composite
def model_rates(draw: st.DrawFn) -> Rates:
    """Rates as a prices file can say them: each batch basis, overrides, cached rate, note."""
    rin, rout = draw(rate_values), draw(rate_values)
    basis = draw(st.sampled_from([BATCH_DISCOUNT, BATCH_RATES, BATCH_NONE, BATCH_UNKNOWN]))
    discount = draw(st.sampled_from([Decimal("0.5"), Decimal("0.25"), Decimal("1"), Decimal("0")]))
    discount_or_none = discount if basis == BATCH_DISCOUNT else None
    bin_, bout = batch_rate(rin, basis, discount_or_none), batch_rate(rout, basis, discount_or_none)
    if basis in (BATCH_DISCOUNT, BATCH_RATES):
        bin_ = draw(st.one_of(st.just(bin_), rate_values))
        bout = draw(st.one_of(st.just(bout), rate_values))
    return Rates(
        rin,
        rout,
        bin_,
        bout,
        draw(st.one_of(st.none(), st.integers(0, rin))),
        draw(st.one_of(st.none(), st.integers(1, 2_000_000))),
        draw(st.one_of(st.none(), st.sampled_from(["2026-11-01", "2025-01-31"]))),
        draw(st.one_of(st.none(), st.sampled_from(["chat", "embedding", "language"]))),
        basis,
        discount_or_none,
        draw(st.one_of(st.none(), st.text(max_size=20))),
    )


@st.composite
def price_tables(draw: st.DrawFn) -> PriceTable:
    models = {model_id: draw(model_rates()) for model_id in draw(st.sets(model_ids, min_size=1, max_size=5))}
    return PriceTable(models)


@settings(max_examples=150, deadline=None)
@given(price_tables())
def test_dump_then_parse_round_trips_exactly(table: PriceTable) -> None:
    """dump_price_table's YAML parses back to exactly the same rates, batch terms and notes."""
    again = parse_price_table(yaml.safe_load(dump_price_table(table)), "dumped.yaml")
    assert dict(again.models) == dict(table.models)


def test_dumped_rates_are_plain_yaml_numbers() -> None:
    """Whole-number rates like $10 are written as YAML numbers, not as '1E+1' strings."""
    table = PriceTable({"m": Rates(10 * 10**6, 20 * 10**6, 5 * 10**6, 10 * 10**6)})
    spec = yaml.safe_load(dump_price_table(table))["models"]["m"]
    assert spec["input"] == 10 and not isinstance(spec["input"], str)
    assert spec["output"] == 20 and not isinstance(spec["output"], str)


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=12,
)
junk_specs = st.dictionaries(
    st.sampled_from(
        [
            "input",
            "output",
            "batch",
            "batch_input",
            "batch_output",
            "cached_input",
            "context_length",
            "read",
            "type",
            "note",
        ]
    )
    | st.text(max_size=6)
    | st.integers(),
    junk,
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        junk,
        st.fixed_dictionaries(
            {"models": st.dictionaries(st.text(max_size=8), junk_specs, max_size=3)},
            optional={"batch_discount": junk},
        ),
    )
)
def test_junk_price_tables_raise_only_config_error(data: object) -> None:
    """Whatever the YAML holds, parse_price_table returns a table or raises ConfigError."""
    try:
        parse_price_table(data, "junk.yaml")
    except ConfigError as exc:
        assert exc.file == "junk.yaml"


def test_project_price_table_loads() -> None:
    """config/prices.yaml loads, and every model has exact, non-negative rates."""
    table = load_price_table(PRICES_YAML)
    assert len(table) > 0
    assert table.source == str(PRICES_YAML)
    raw = yaml.safe_load(PRICES_YAML.read_text(encoding="utf-8"))["models"]
    assert set(table.models) == set(raw)
    for model_id, spec in raw.items():
        rates = table.get(model_id)
        assert rates is not None
        if "unit" in spec:  # priced per megapixel, image or second
            assert rates.per_unit == unit_price_to_pusd(spec["per_unit"]) and rates.unit == spec["unit"]
            continue
        assert rates.input == rate_to_pusd(spec["input"])
        assert rates.output == rate_to_pusd(spec["output"])


def test_project_price_table_says_for_each_model_whether_batches_are_discounted() -> None:
    """Every model of config/prices.yaml states its batch terms; the discounted ones are together's."""
    table = load_price_table(PRICES_YAML)
    raw = yaml.safe_load(PRICES_YAML.read_text(encoding="utf-8"))["models"]
    assert all("batch" in spec for spec in raw.values())
    discounted = {m for m, r in table.models.items() if r.batch == BATCH_DISCOUNT}
    assert discounted == {"meta-llama/Llama-3.3-70B-Instruct-Turbo", "mistralai/Mixtral-8x7B-Instruct-v0.1"}
    assert table.header and "docs.together.ai/docs/inference/batch/overview" in "\n".join(table.header)


def test_missing_price_file_is_a_config_error(tmp_path: Path) -> None:
    """A prices file that does not exist raises ConfigError naming it."""
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as info:
        load_price_table(path)
    assert info.value.file == str(path)


def test_invalid_yaml_price_file_is_a_config_error(tmp_path: Path) -> None:
    """A prices file that is not YAML raises ConfigError naming it."""
    path = tmp_path / "prices.yaml"
    path.write_text("models: {m: [input: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_price_table(path)
    assert info.value.file == str(path)
    assert "YAML" in info.value.problem
