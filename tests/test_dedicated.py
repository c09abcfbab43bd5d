"""Dedicated endpoints by the minute (proxy/core/dedicated.py) and their config (`dedicated:`)."""

from __future__ import annotations

import itertools
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import DedicatedSettings, parse_config
from proxy.core.budgets import Periods
from proxy.core.chargeback import DedicatedEndpoint
from proxy.core.dedicated import (
    MINUTE_US,
    PUSD_PER_CENT,
    DedicatedError,
    EndpointMinute,
    MinutesLine,
    better,
    charge_view,
    dedicated_charges,
    hardware_prices,
    measured,
    minute_cost_pusd,
    minute_start,
    observe,
    one_minute,
    parse_cents,
    parse_decimal_json,
    rank,
    replicas_of,
    spread,
)
from proxy.core.report import ReportError
from proxy.core.rollups import rollup_rows
from proxy.errors import ConfigError
from proxy.ledger import LedgerRow
from tests.test_docs import ROOT

UTC = Periods()
NOV_US = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # $0.88 / $0.88, batch 50 % off
USD = 10**12


# -- minutes -------------------------------------------------------------------------------------


def test_minutes_are_cut_on_the_epoch_in_utc() -> None:
    """A minute starts at a multiple of 60 s since the epoch: 12:34:59.999999 is in 12:34:00."""
    t = NOV_US + 12 * 3_600_000_000 + 34 * 60_000_000
    assert minute_start(t) == t
    assert minute_start(t + 59_999_999) == t
    assert minute_start(t + 60_000_000) == t + 60_000_000
    assert minute_start(t + 1_500_000, 1_000_000) == t + 1_000_000  # a test "minute" of 1 s


def test_a_look_counts_only_within_one_minute() -> None:
    """A round trip inside a minute names it; one across a boundary names none (never guessed)."""
    t = NOV_US
    assert one_minute(t + 1, t + 59_000_000) == t
    assert one_minute(t + 59_999_000, t + 60_000_001) is None
    assert one_minute(t + 60_000_000, t + 60_000_000) == t + 60_000_000
    assert one_minute(t + 10, t + 5) is None  # a clock that went backwards: no minute either


# -- money ---------------------------------------------------------------------------------------


def test_cents_per_minute_are_read_from_the_json_text() -> None:
    """Prices keep the digits together sent: JSON numbers become Decimals, never floats."""
    body = b'{"object":"list","data":[{"id":"a","pricing":{"cents_per_minute":5.42}},'
    body += b'{"id":"b","pricing":{"cents_per_minute":3.990000000000000213}},'
    body += b'{"id":"c","pricing":{"cents_per_minute":7}},{"id":"d","pricing":{}},'
    body += b'{"pricing":{"cents_per_minute":1}}]}'
    prices = hardware_prices(parse_decimal_json(body))
    assert prices == {"a": Decimal("5.42"), "b": Decimal("3.990000000000000213"), "c": Decimal(7)}
    assert str(prices["b"]) == "3.990000000000000213"  # a float would have said 3.99
    with pytest.raises(DedicatedError):
        parse_cents(5.42)
    with pytest.raises(DedicatedError):
        parse_cents(Decimal(-1))
    with pytest.raises(DedicatedError):
        parse_cents("1e3")
    with pytest.raises(DedicatedError):
        hardware_prices({"data": "none"})
    assert parse_cents("0.1") == Decimal("0.1")


def test_minute_cost_by_hand() -> None:
    """3 replicas of 2x A100 at 5.42 cents a minute: 16.26 cents = $0.1626 = 162,600,000,000 pUSD."""
    assert PUSD_PER_CENT == 10**10
    assert minute_cost_pusd(3, Decimal("5.42")) == 162_600_000_000
    assert minute_cost_pusd(0, Decimal("5.42")) == 0
    assert minute_cost_pusd(1, Decimal("3.99")) == 39_900_000_000
    # below a pico-USD only with more than 10 decimals of a cent: half-up to a whole pico-USD
    assert minute_cost_pusd(1, Decimal("0.00000000005")) == 1
    assert minute_cost_pusd(1, Decimal("0.00000000004999")) == 0
    with pytest.raises(DedicatedError):
        minute_cost_pusd(-1, Decimal(1))


@given(
    st.integers(min_value=0, max_value=10_000),
    st.decimals(min_value=0, max_value=100_000, places=14, allow_nan=False, allow_infinity=False),
)
def test_minute_cost_is_exact(replicas: int, cents: Decimal) -> None:
    """Property: the cost is replicas x cents x 1e10 exactly, rounded half-up once, to a pico-USD."""
    exact = Fraction(cents) * replicas * PUSD_PER_CENT
    floor = exact.numerator // exact.denominator
    expected = floor + (1 if exact - floor >= Fraction(1, 2) else 0)
    assert minute_cost_pusd(replicas, cents) == expected


# -- which replica count --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"state": "STARTED", "autoscaling": {"min_replicas": 3, "max_replicas": 3}}, (3, 3, 3)),
        ({"state": "STOPPED", "autoscaling": {"min_replicas": 2, "max_replicas": 2}}, (0, 0, 0)),
        ({"state": "STARTED", "autoscaling": {"min_replicas": 1, "max_replicas": 4}}, (None, 1, 4)),
        ({"state": "PENDING", "autoscaling": {"min_replicas": 2, "max_replicas": 2}}, (None, 0, 2)),
        ({"state": "STARTING", "autoscaling": {"min_replicas": 2, "max_replicas": 5}}, (None, 0, 5)),
        ({"state": "STARTED"}, (None, 0, None)),
        ({"state": "STARTED", "autoscaling": {"min_replicas": "2", "max_replicas": 2}}, (None, 0, 2)),
        ({"state": "STARTED", "autoscaling": {"min_replicas": -1, "max_replicas": -1}}, (None, 0, None)),
        ({"state": "STARTED", "autoscaling": {"min_replicas": True, "max_replicas": True}}, (None, 0, None)),
    ],
)
def test_the_replica_count_is_known_only_when_the_object_says_it(obj: dict[str, Any], expected: Any) -> None:
    """v1 objects carry no running count: STOPPED runs 0, STARTED with min == max runs that many,
    anything else is unknown within the bounds it gives (never guessed)."""
    assert replicas_of(obj) == expected


def endpoint(state: str = "STARTED", lo: int = 2, hi: int = 2, hardware: str = "2x_a100") -> dict[str, Any]:
    return {
        "object": "endpoint",
        "id": "endpoint-1",
        "name": "acme/llama-70b-a1b2",
        "model": MODEL,
        "hardware": hardware,
        "type": "dedicated",
        "state": state,
        "autoscaling": {"min_replicas": lo, "max_replicas": hi},
    }


PRICES = {"2x_a100": Decimal("5.42"), "1x_h100": Decimal("3.99")}


def test_an_observation_prices_the_minute() -> None:
    """Known: replicas x price, bounds equal; autoscaling: unknown, bounded by min and max."""
    m = observe(endpoint(), PRICES, NOV_US, NOV_US + 5, UTC)
    assert (m.replicas, m.cost_pusd, m.cost_low_pusd, m.cost_high_pusd) == (
        2,
        108_400_000_000,
        *(108_400_000_000,) * 2,
    )
    assert (m.period, m.name, m.model, m.hardware, m.state) == (
        "2026-11",
        "acme/llama-70b-a1b2",
        MODEL,
        "2x_a100",
        "STARTED",
    )
    auto = observe(endpoint(lo=1, hi=3), PRICES, NOV_US, NOV_US, UTC)
    assert (auto.replicas, auto.cost_pusd, auto.cost_low_pusd, auto.cost_high_pusd) == (
        None,
        None,
        54_200_000_000,
        162_600_000_000,
    )
    unpriced = observe(endpoint(hardware="8x_b200"), PRICES, NOV_US, NOV_US, UTC)
    assert (unpriced.replicas, unpriced.cents_per_minute, unpriced.cost_pusd) == (2, None, None)
    stopped = observe(endpoint(state="STOPPED", hardware="8x_b200"), PRICES, NOV_US, NOV_US, UTC)
    assert stopped.cost_pusd == 0  # nothing runs: free whatever the price
    with pytest.raises(DedicatedError):
        observe({"state": "STARTED"}, PRICES, NOV_US, NOV_US, UTC)


def minute_of(
    replicas: int | None, cost: int | None, lo: int | None = None, hi: int | None = None
) -> EndpointMinute:
    return EndpointMinute(
        "endpoint-1", NOV_US, "2026-11", "n", MODEL, "2x_a100", "STARTED", replicas, None, None,
        Decimal("5.42"), cost, cost if lo is None else lo, cost if hi is None else hi, NOV_US,
    )  # fmt: skip


def test_the_larger_observation_of_a_minute_stays() -> None:
    """Known beats unknown, more replicas beat fewer, then the dearer; an equal one changes nothing."""
    assert better(minute_of(1, 10), None)
    assert better(minute_of(0, 0), minute_of(None, None, 0, 30))
    assert better(minute_of(3, 30), minute_of(1, 10))
    assert not better(minute_of(1, 10), minute_of(3, 30))
    assert not better(minute_of(1, 10), minute_of(1, 10))
    assert better(minute_of(1, 12), minute_of(1, 10))  # a price change seen by another replica
    assert better(minute_of(None, None, 0, 40), minute_of(None, None, 0, 30))
    assert rank(minute_of(2, 20)) == rank(
        {"replicas": 2, "cost_pusd": 20, "cost_low_pusd": 20, "cost_high_pusd": 20}
    )


observations = st.builds(
    lambda r, c, lo, hi: minute_of(r, None if r is None else c, lo, hi),
    st.one_of(st.none(), st.integers(0, 5)),
    st.integers(0, 100),
    st.integers(0, 50),
    st.integers(0, 100),
)


@given(st.lists(observations, min_size=1, max_size=6))
def test_the_kept_observation_does_not_depend_on_arrival_order(seen: list[EndpointMinute]) -> None:
    """Property: whatever order two replicas' looks arrive in, the minute ends at the same rank."""
    ends = set()
    for order in itertools.islice(itertools.permutations(seen), 24):
        kept: EndpointMinute | None = None
        for m in order:
            if better(m, kept):
                kept = m
        assert kept is not None
        ends.add(rank(kept))
    assert ends == {max(rank(m) for m in seen)}


# -- spreading a cost over tenants ---------------------------------------------------------------


def test_spread_by_hand_and_the_remainder_rule() -> None:
    """$1 over 1:1:1 tokens: 333,333,333,334 to the first by name, 333,333,333,333 to the others."""
    assert spread(USD, {"globex": 5, "acme": 5, "initech": 5}) == {
        "acme": 333_333_333_334,
        "globex": 333_333_333_333,
        "initech": 333_333_333_333,
    }
    assert spread(10, {"a": 0, "b": 0}) == {"a": 0, "b": 0}
    assert spread(7, {"a": 1, "b": 0}) == {"a": 7, "b": 0}
    assert spread(0, {"a": 3}) == {"a": 0}


@settings(max_examples=300)
@given(
    st.integers(min_value=0, max_value=10**20),
    st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=4), st.integers(0, 10**12), min_size=1, max_size=12
    ),
)
def test_spread_parts_sum_exactly(total: int, tokens: dict[str, int]) -> None:
    """Property: the parts add up to the whole exactly; each is within one pico-USD of its exact
    share; larger shares never get less; nobody without tokens is charged."""
    parts = spread(total, tokens)
    whole = sum(tokens.values())
    if whole == 0:
        assert set(parts.values()) == {0}
        return
    assert sum(parts.values()) == total
    for name, n in tokens.items():
        exact = Fraction(total * n, whole)
        assert abs(parts[name] - exact) < 1
        if n == 0:
            assert parts[name] == 0
    for a, b in itertools.combinations(tokens, 2):
        if tokens[a] > tokens[b]:
            assert parts[a] >= parts[b]


# -- a month of minutes, charged back -------------------------------------------------------------


def line(endpoint_id: str, first: int, last: int, minutes: int, **kw: Any) -> MinutesLine:
    base: dict[str, Any] = {
        "endpoint_id": endpoint_id,
        "name": f"acme/{endpoint_id}",
        "model": MODEL,
        "hardware": "2x_a100",
        "cents_per_minute": Decimal("5.42"),
        "minutes": minutes,
        "known_minutes": minutes,
        "replica_minutes": minutes,
        "cost_pusd": minutes * 54_200_000_000,
        "unknown_low_pusd": 0,
        "unknown_high_pusd": 0,
        "first_minute": NOV_US + first * MINUTE_US,
        "last_minute": NOV_US + last * MINUTE_US,
    }
    base.update(kw)
    return MinutesLine(**base)


def test_a_month_merges_lines_and_counts_the_minutes_not_observed() -> None:
    """Two price lines of one endpoint merge; minutes 0..9 with 2 + 5 observed leave 3 not observed."""
    (m,) = measured(
        [
            line("ep-a", 0, 1, 2),
            line("ep-a", 5, 9, 5, cents_per_minute=Decimal("6"), cost_pusd=5 * 60_000_000_000),
        ]
    )
    assert (m.minutes, m.unobserved_minutes, m.cost_pusd) == (7, 3, 2 * 54_200_000_000 + 300_000_000_000)
    assert m.prices == (Decimal("5.42"), Decimal(6))
    assert "3 minute(s) not observed" in m.basis
    unknown = measured([line("ep-b", 0, 3, 4, known_minutes=3, unknown_low_pusd=10, unknown_high_pusd=None)])[
        0
    ]
    assert unknown.unknown_minutes == 1 and "unknown replica count ($0.00000000001..$?" in unknown.basis


def usage_row(i: int, tenant: str, model: str, prompt: int, completion: int, **kw: Any) -> LedgerRow:
    return LedgerRow(
        f"req_{i}", tenant, "k", model, "chat", kw.pop("mode", "serverless"), None, None, False, NOV_US + i,
        "2026-11", status=kw.pop("status", "ok"), finished_us=NOV_US + i + 1, prompt_tokens=prompt,
        completion_tokens=completion, usage_source="upstream", cost_pusd=(prompt + completion) * 880_000,
    )  # fmt: skip


def test_measured_cost_replaces_the_configured_figure() -> None:
    """Linked and measured: the measured cost is spread by token share (sums exactly); linked but
    unmeasured: the configured figure, labelled; a followed endpoint nobody configured: by its name."""
    rows = [
        usage_row(1, "acme", MODEL, 3_000, 1_000),
        usage_row(2, "globex", MODEL, 1_000, 1_000),
        usage_row(3, "globex", MODEL, 500, 0, mode="batch"),  # never reached the endpoint
        usage_row(4, "initech", "acme/ep-b", 700, 300),  # sent to endpoint ep-b by its name
    ]
    rollups = list(rollup_rows(rows, UTC))
    configured = [
        DedicatedEndpoint("shared-70b", MODEL, 1000 * USD, "monthly_usd 1000", "ep-a"),
        DedicatedEndpoint("spare", "deepseek-ai/DeepSeek-V3", 10 * USD, "monthly_usd 10", "ep-gone"),
    ]
    cost = 7 * 54_200_000_000 + 1  # an odd amount: the remainder rule decides the last pico-USD
    found = measured([line("ep-a", 0, 6, 7, cost_pusd=cost), line("ep-b", 0, 0, 1)])
    charges = dedicated_charges(rollups, "2026-11", configured, found, parse_prices())
    assert [(c.chargeback.endpoint, c.source) for c in charges] == [
        ("shared-70b", "measured"),
        ("spare", "configured"),
        ("ep-b", "measured"),
    ]
    shared = charges[0].chargeback
    assert shared.monthly_pusd == cost and shared.basis.startswith("measured: 7 replica-minutes")
    charged = {x.tenant: x.charge_pusd for x in shared.lines}
    assert charged == spread(cost, {"acme": 4_000, "globex": 2_000})
    assert sum(charged.values()) == cost
    assert charges[1].chargeback.basis == "monthly_usd 10 (configured: no measured minutes)"
    by_name = charges[2].chargeback
    assert (by_name.model, [x.tenant for x in by_name.lines]) == ("acme/ep-b", ["initech"])
    view = charge_view(charges[0])
    assert view["source"] == "measured" and view["measured"]["minutes_observed"] == 7
    compare = view["compare"]
    assert compare["tokens"] == 6_000
    assert compare["serverless_usd"] == "0.00528"  # 6,000 x $0.88 / 1M
    assert compare["batch_usd"] == "0.00264"
    assert compare["cheapest"] == "batch"
    assert compare["dedicated_usd_per_mtok"] == str(round(Decimal(cost) / USD / 6_000 * 10**6, 6).normalize())


def test_an_entry_naming_the_endpoint_by_its_name_is_linked() -> None:
    """An entry whose model is a followed endpoint's name charges those rows with the measured cost,
    once: the endpoint is not charged a second time under its id."""
    rows = [usage_row(1, "acme", "acme/ep-a", 700, 300)]
    configured = [DedicatedEndpoint("mine", "acme/ep-a", 10 * USD, "monthly_usd 10")]
    found = measured([line("ep-a", 0, 1, 2)])
    (charge,) = dedicated_charges(list(rollup_rows(rows, UTC)), "2026-11", configured, found, parse_prices())
    assert (charge.chargeback.endpoint, charge.source, charge.chargeback.monthly_pusd) == (
        "mine",
        "measured",
        2 * 54_200_000_000,
    )
    assert [x.charge_pusd for x in charge.chargeback.lines] == [2 * 54_200_000_000]


def test_an_endpoint_id_alone_is_measured_or_nothing() -> None:
    """An entry with only endpoint_id and no minutes is charged nothing, and says so (source none)."""
    configured = [DedicatedEndpoint("x", MODEL, 0, "measured only", "ep-a", configured=False)]
    (charge,) = dedicated_charges([], "2026-11", configured, [], parse_prices())
    assert charge.source == "none" and charge.chargeback.monthly_pusd == 0
    with pytest.raises(ReportError):
        dedicated_charges([], "2026-13", configured, [], parse_prices())


def parse_prices() -> Any:
    return config_with().prices


# -- config --------------------------------------------------------------------------------------


def config_with(dedicated: Any = None, endpoints: Any = None) -> Any:
    data: dict[str, Any] = {"prices": str(ROOT / "config" / "prices.yaml"), "tenants": {"acme": {}}}
    if dedicated is not None:
        data["dedicated"] = dedicated
    if endpoints is not None:
        data["dedicated_endpoints"] = endpoints
    return parse_config(data, "c.yaml", Path("."))


def test_dedicated_config_defaults_and_the_followed_set() -> None:
    """Nothing followed by default; follow + every endpoint_id, once each, in order."""
    assert config_with().dedicated == DedicatedSettings()
    assert config_with().followed_endpoints() == ()
    c = config_with(
        {"follow": ["endpoint-b", "endpoint-a", "endpoint-b"], "poll_seconds": 10, "discover": True},
        {"shared": {"model": MODEL, "endpoint_id": "endpoint-c"}},
    )
    assert c.followed_endpoints() == ("endpoint-b", "endpoint-a", "endpoint-c")
    assert c.dedicated.discover and c.dedicated.poll_seconds == 10 and c.dedicated.minute_us == MINUTE_US
    (e,) = c.dedicated_endpoints
    assert (e.endpoint_id, e.configured, e.monthly_pusd) == ("endpoint-c", False, 0)
    fast = config_with({"minute_seconds": 1, "follow": ["endpoint-a"]})
    assert fast.dedicated.minute_us == 1_000_000 and fast.dedicated.poll_seconds == 0.25


@pytest.mark.parametrize(
    ("dedicated", "endpoints", "key", "words"),
    [
        ({"follow": ["../etc"]}, None, "dedicated.follow", "endpoint id"),
        ({"follow": "endpoint-a"}, None, "dedicated.follow", "list"),
        ({"discover": "yes"}, None, "dedicated.discover", "true or false"),
        ({"poll_seconds": 31}, None, "dedicated.poll_seconds", "half a minute"),
        ({"poll_seconds": 0}, None, "dedicated.poll_seconds", "greater than 0"),
        ({"minute_seconds": 61}, None, "dedicated.minute_seconds", "at most 60"),
        ({"max_endpoints": 0}, None, "dedicated.max_endpoints", "between 1"),
        ({"every": 1}, None, "dedicated.every", "unknown key"),
        (
            None,
            {"e": {"model": MODEL, "endpoint_id": "a b"}},
            "dedicated_endpoints.e.endpoint_id",
            "endpoint id",
        ),
        (
            None,
            {
                "e": {"model": MODEL, "endpoint_id": "ep-1"},
                "f": {"model": "deepseek-ai/DeepSeek-V3", "endpoint_id": "ep-1"},
            },
            "dedicated_endpoints.f.endpoint_id",
            "already linked",
        ),
        (
            None,
            {"e": {"model": MODEL, "endpoint_id": "ep-1", "hours_per_month": 5}},
            "dedicated_endpoints.e.hours_per_month",
            "only with",
        ),
    ],
)
def test_dedicated_config_errors_name_file_and_key(
    dedicated: Any, endpoints: Any, key: str, words: str
) -> None:
    """Each mistake in `dedicated:` or an endpoint_id is a ConfigError naming the file and the key."""
    with pytest.raises(ConfigError) as err:
        config_with(dedicated, endpoints)
    assert str(err.value).startswith(f"c.yaml: {key}:"), str(err.value)
    assert words in str(err.value)


def test_linked_endpoint_keeps_its_configured_figure_as_the_fallback() -> None:
    """endpoint_id with hourly_usd: the figure stays (configured), and the endpoint is followed."""
    c = config_with(None, {"e": {"model": MODEL, "endpoint_id": "ep-1", "hourly_usd": "3.36"}})
    (e,) = c.dedicated_endpoints
    assert (e.endpoint_id, e.configured, e.monthly_pusd, e.basis) == (
        "ep-1",
        True,
        2452_800_000_000_000,
        "hourly_usd 3.36 x 730 h",
    )
    assert c.followed_endpoints() == ("ep-1",)


def test_half_up_matches_decimal_quantize() -> None:
    """The rounding the simulator uses (Decimal quantize half-up) is the one the core uses."""
    for cents in ("0.00000000005", "0.00000000015", "5.42", "0.12345678901234"):
        d = Decimal(cents) * 3 * PUSD_PER_CENT
        assert minute_cost_pusd(3, Decimal(cents)) == int(d.quantize(Decimal(1), rounding=ROUND_HALF_UP))
