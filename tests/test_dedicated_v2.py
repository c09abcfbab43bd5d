"""Dedicated endpoints read through together's v2 API: the arithmetic (proxy/core/dedicated.py),
the config, the SQLite column step, the simulator's wire format, and the follower against the
simulator on a hand-driven clock (tests/test_dedicated_follower.py's rig)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from together.types import Endpoint, EndpointDeploymentSummary
from together.types.endpoint_deployment import EndpointDeployment
from together.types.endpoints.inference_instance_type import InferenceInstanceType

from proxy.config import Config, load_config
from proxy.core.budgets import Periods
from proxy.core.dedicated import (
    DedicatedError,
    instance_type_prices,
    observe_v2,
    parse_decimal_json,
    replica_minute_pusd,
    round_half_up,
    v2_minute_cost_pusd,
)
from proxy.errors import ConfigError
from proxy.ledger.sqlite import SQLiteLedger
from proxy.simulator.endpoints import PROJECT
from tests.test_dedicated_follower import A100, H100, MODEL, NOV_S, rig

MINUTE = NOV_S * 1_000_000 + 60_000_000 * 5
MONTH_MINUTES = 31 * 24 * 60  # 44,640: the longest month


def dep(
    hardware: str, ready: int | None, state: str = "DEPLOYMENT_STATE_READY", **more: Any
) -> dict[str, Any]:
    d: dict[str, Any] = {"hardware": hardware, "state": state, "modelId": MODEL}
    d["autoscaling"] = {"minReplicas": more.pop("lo", 1), "maxReplicas": more.pop("hi", 4)}
    if ready is not None:
        d["readyReplicas"] = ready
    return {**d, **more}


def endpoint(*deployments: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"id": "endpoint-v2", "name": "proj/shared", "deployments": list(deployments), **more}


PRICES = {A100: Decimal(325), H100: Decimal(239), "8x_b200": Decimal("1234.5")}


# -- arithmetic --------------------------------------------------------------------------------


def test_a_replica_minute_is_cents_per_hour_times_1e10_over_60_exactly() -> None:
    assert replica_minute_pusd(Decimal(325)) == Fraction(325 * 10**10, 60) == Fraction(162_500_000_000, 3)
    assert replica_minute_pusd(Decimal("0.06")) == 10_000_000  # 6e-4 USD/h: 1e-5 USD/min
    assert round_half_up(Fraction(1, 2)) == 1 and round_half_up(Fraction(3, 2)) == 2
    assert round_half_up(Fraction(5, 3)) == 2 and round_half_up(Fraction(4, 3)) == 1
    # 1 replica at 325 cents/h: 54,166,666,666.67 -> 54,166,666,667; 3 replicas: exactly 162.5e9;
    # 2: 108,333,333,333.33 -> ...333: rounded once per minute, never per replica
    assert v2_minute_cost_pusd({A100: 1}, PRICES) == 54_166_666_667
    assert v2_minute_cost_pusd({A100: 3}, PRICES) == 162_500_000_000 != 3 * 54_166_666_667
    assert v2_minute_cost_pusd({A100: 2}, PRICES) == 108_333_333_333
    # two instance types in one minute: summed exactly, then rounded once
    exact = Fraction(325 * 10**10, 60) + 2 * Fraction(239 * 10**10, 60)
    assert v2_minute_cost_pusd({A100: 1, H100: 2}, PRICES) == round_half_up(exact) == 133_833_333_333
    assert v2_minute_cost_pusd({A100: 0, "unpriced": 0}, PRICES) == 0
    with pytest.raises(KeyError):
        v2_minute_cost_pusd({"unpriced": 1}, PRICES)
    with pytest.raises(DedicatedError):
        v2_minute_cost_pusd({A100: -1}, PRICES)


@settings(max_examples=60, deadline=None)
@given(
    prices=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
    decimals=st.lists(st.integers(0, 12), min_size=3, max_size=3),
    ready=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=50
    ),
)
def test_a_month_of_rows_is_within_half_a_pico_dollar_per_row_of_the_exact_sum(
    prices: list[int], decimals: list[int], ready: list[tuple[int, int, int]]
) -> None:
    """The rule: each minute row = floor(exact + 1/2). A month of N rows (the ready counts cycle
    over 44,640 minutes) then lies within N/2 pico-USD of the exact rational sum, each row within
    1/2 (1/3 when every price is whole cents)."""
    cents = {f"t{i}": Decimal(p).scaleb(-decimals[i]) for i, p in enumerate(prices)}
    whole = all(c == c.to_integral_value() for c in cents.values())
    rows = 0
    exact_sum = Fraction(0)
    per_pattern = []
    for counts in ready:
        by_type = {t: n for t, n in zip(cents, counts, strict=False)}
        exact = sum((n * replica_minute_pusd(cents[t]) for t, n in by_type.items()), Fraction(0))
        row = v2_minute_cost_pusd(by_type, cents)
        assert abs(row - exact) <= (Fraction(1, 3) if whole else Fraction(1, 2))
        per_pattern.append((row, exact))
    full, rest = divmod(MONTH_MINUTES, len(ready))
    for i, (row, exact) in enumerate(per_pattern):
        times = full + (1 if i < rest else 0)
        rows += row * times
        exact_sum += exact * times
    assert abs(rows - exact_sum) <= Fraction(MONTH_MINUTES, 2)
    assert abs(rows - round_half_up(exact_sum)) <= Fraction(MONTH_MINUTES, 2) + Fraction(1, 2)


def test_instance_type_prices_are_exact_decimals_never_floats() -> None:
    text = (
        '{"object": "list", "data": [{"id": "a", "priceCentsPerHour": 325},'
        ' {"id": "b", "priceCentsPerHour": 123.456789012345678},'
        ' {"id": "c", "priceCentsPerHour": -1}, {"id": "d"}, {"priceCentsPerHour": 5}, 7],'
        ' "next_cursor": null}'
    )
    prices = instance_type_prices(parse_decimal_json(text))
    assert prices == {"a": Decimal(325), "b": Decimal("123.456789012345678")}
    assert instance_type_prices({"data": [{"id": "f", "priceCentsPerHour": 1.5}]}) == {}  # a float
    with pytest.raises(DedicatedError):
        instance_type_prices({"object": "list"})


# -- one v2 observation -------------------------------------------------------------------------


def test_ready_replicas_are_summed_per_instance_type_and_priced_per_hour() -> None:
    obj = endpoint(
        dep(A100, 2),
        dep(H100, 1, trafficMode="TRAFFIC_MODE_SHADOW"),  # shadow replicas run (and bill) too
        dep(A100, 1, "DEPLOYMENT_STATE_SCALING", desiredReplicas=3),
        dep(H100, 5, "DEPLOYMENT_STATE_STOPPED"),  # a stopped deployment runs none
        endpointType="ENDPOINT_TYPE_DEDICATED",
    )
    m = observe_v2(obj, PRICES, MINUTE, MINUTE + 1, Periods())
    exact = 3 * Fraction(325 * 10**10, 60) + Fraction(239 * 10**10, 60)
    assert (m.replicas, m.cost_pusd, m.cost_low_pusd, m.cost_high_pusd) == (
        4,
        round_half_up(exact),
        m.cost_pusd,
        m.cost_pusd,
    )
    assert m.cost_pusd == 202_333_333_333
    assert m.hardware == f"{H100}+{A100}" and m.cents_per_hour is None  # mixed: no single price
    assert (m.min_replicas, m.max_replicas, m.model, m.name, m.period) == (
        4,
        16,
        MODEL,
        "proj/shared",
        "2026-11",
    )
    assert m.cents_per_minute is None
    one = observe_v2(endpoint(dep(A100, 1)), PRICES, MINUTE, MINUTE, Periods())
    assert (one.hardware, one.cents_per_hour, one.cost_pusd) == (A100, Decimal(325), 54_166_666_667)


def test_an_unsaid_ready_count_is_unknown_within_bounds_never_guessed() -> None:
    m = observe_v2(endpoint(dep(A100, 1), dep(A100, None, hi=3)), PRICES, MINUTE, MINUTE, Periods())
    assert (m.replicas, m.cost_pusd) == (None, None)
    assert m.cost_low_pusd == v2_minute_cost_pusd({A100: 1}, PRICES)  # the unsaid one: 0 at least
    assert m.cost_high_pusd == v2_minute_cost_pusd({A100: 4}, PRICES)  # ... its maxReplicas at most
    no_max = dep(A100, None)
    del no_max["autoscaling"]
    m = observe_v2(endpoint(no_max), PRICES, MINUTE, MINUTE, Periods())
    assert (m.cost_pusd, m.cost_low_pusd, m.cost_high_pusd) == (None, 0, None)


def test_an_unpriced_instance_type_leaves_the_cost_unknown_and_nothing_is_zero_by_default() -> None:
    m = observe_v2(endpoint(dep("9x_unknown", 2)), PRICES, MINUTE, MINUTE, Periods())
    assert (m.replicas, m.cost_pusd, m.cents_per_hour) == (2, None, None)
    m = observe_v2(
        endpoint(dep("9x_unknown", 0, "DEPLOYMENT_STATE_STOPPED")), PRICES, MINUTE, MINUTE, Periods()
    )
    assert (m.replicas, m.cost_pusd) == (0, 0)  # nothing ran: nothing to pay, price or not
    m = observe_v2(endpoint(), PRICES, MINUTE, MINUTE, Periods())
    assert (m.replicas, m.cost_pusd, m.state) == (0, 0, "NO_DEPLOYMENTS")


@pytest.mark.parametrize(
    "obj",
    [
        endpoint(endpointType="ENDPOINT_TYPE_SERVERLESS"),
        {"name": "no id", "deployments": []},
        {"id": "endpoint-v2"},
        endpoint("not an object"),  # type: ignore[arg-type]
        {"id": "endpoint-v2", "deployments": [dep(A100, 1)] * 1001},
    ],
)
def test_malformed_or_non_dedicated_v2_objects_are_refused(obj: dict[str, Any]) -> None:
    with pytest.raises(DedicatedError):
        observe_v2(obj, PRICES, MINUTE, MINUTE, Periods())


def test_a_replica_count_out_of_range_is_not_believed() -> None:
    m = observe_v2(endpoint(dep(A100, 10**9)), PRICES, MINUTE, MINUTE, Periods())
    assert m.replicas is None and m.cost_pusd is None
    m = observe_v2(endpoint(dep(A100, True)), PRICES, MINUTE, MINUTE, Periods())  # type: ignore[arg-type]
    assert m.replicas is None


# -- config -------------------------------------------------------------------------------------


def _config(tmp_path: Path, dedicated: str) -> Config:
    from tests.test_docs import ROOT

    text = (ROOT / "config" / "example.yaml").read_text() + "dedicated:\n" + dedicated
    (tmp_path / "prices.yaml").write_text((ROOT / "config" / "prices.yaml").read_text())
    (tmp_path / "c.yaml").write_text(text)
    return load_config(tmp_path / "c.yaml")


def test_config_api_is_v2_when_a_project_is_named_and_v1_otherwise(tmp_path: Path) -> None:
    c = _config(tmp_path, "  project_id: proj-123\n").dedicated
    assert (c.api, c.project_id) == ("v2", "proj-123")
    c = _config(tmp_path, "  discover: true\n").dedicated
    assert (c.api, c.project_id) == ("v1", None)
    c = _config(tmp_path, "  api: v1\n  project_id: proj-123\n").dedicated
    assert (c.api, c.project_id) == ("v1", "proj-123")
    with pytest.raises(ConfigError, match="project_id"):
        _config(tmp_path, "  api: v2\n")
    with pytest.raises(ConfigError, match="api"):
        _config(tmp_path, "  api: v3\n  project_id: p\n")
    with pytest.raises(ConfigError, match="project_id"):
        _config(tmp_path, "  project_id: ../../v1/files\n")


# -- the SQLite column step ---------------------------------------------------------------------


async def test_a_ledger_made_before_v2_gets_the_price_per_hour_column(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path)
    await ledger.open()
    await ledger.close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE endpoint_minutes DROP COLUMN cents_per_hour")
    for _ in range(2):  # idempotent
        ledger = SQLiteLedger(path)
        await ledger.open()
        try:
            m = observe_v2(endpoint(dep(A100, 2)), PRICES, MINUTE, MINUTE, Periods())
            await ledger.record_endpoint_minute(m)
            (line,) = await ledger.endpoint_minutes("2026-11")
        finally:
            await ledger.close()
        assert (line.cents_per_hour, line.cost_pusd, line.replica_minutes) == (
            Decimal(325),
            108_333_333_333,
            2,
        )


# -- the simulator's v2 wire format -------------------------------------------------------------


async def test_the_simulator_speaks_the_sdk_types(tmp_path: Path) -> None:
    """Its v2 answers validate as the together SDK's own models (aliases and all), and ready
    replicas lag the desired ones when scaling up."""
    async with rig(tmp_path) as r:
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, A100, [(0, 1), (2, 3)], start_minute=m0, ready_lag=1)
        r.clock.now = (m0 + 2) * 60 + 1
        base = f"{r.sim.url.removesuffix('/v1')}/v2/projects/{PROJECT}/endpoints"
        auth = {"Authorization": "Bearer sk-x"}
        import aiohttp

        async with aiohttp.ClientSession(headers=auth) as s:
            async with s.get(f"{base}/{ep.id}") as resp:
                e = Endpoint.model_validate(await resp.json())
            async with s.get(f"{base}/{ep.id}/deployments") as resp:
                d = EndpointDeployment.model_validate((await resp.json())["data"][0])
            async with s.get(base) as resp:
                assert [x["id"] for x in (await resp.json())["data"]] == [ep.id]
            async with s.get(r.sim.url.removesuffix("/v1") + "/v2/public/inference-instance-types") as resp:
                types = [InferenceInstanceType.model_validate(x) for x in (await resp.json())["data"]]
            async with s.get(base.replace(PROJECT, "proj-other")) as resp:
                assert resp.status == 404
        (summary,) = e.deployments
        assert isinstance(summary, EndpointDeploymentSummary)
        assert (summary.desired_replicas, summary.ready_replicas, summary.hardware) == (3, 1, A100)
        assert summary.state == "DEPLOYMENT_STATE_SCALING" and d.status.ready_replicas == 1
        assert {t.id: t.price_cents_per_hour for t in types}[A100] == 325


# -- the follower, v2, on a hand-driven clock ---------------------------------------------------


def v2(config: Config, *follow: str, discover: bool = False) -> Config:
    settings = replace(config.dedicated, api="v2", project_id=PROJECT, follow=follow, discover=discover)
    return replace(config, dedicated=settings)


async def test_an_autoscaling_endpoint_costs_what_the_simulator_bills_minute_by_minute(
    tmp_path: Path,
) -> None:
    """desired 1 -> 3 -> 2 -> 0, ready one minute late when scaling up: ready 0, 1, 1, 3, 3, 2, 2,
    0. Looked at every minute (twice in some): the ledger equals the simulator's v2 bill exactly,
    every minute known (v1 could only say "between min and max")."""
    async with rig(tmp_path) as r:
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, A100, [(0, 1), (2, 3), (5, 2), (7, 0)], start_minute=m0, ready_lag=1)
        r.follower.config = lambda: v2(r.config, ep.id)
        ready = []
        for minute in range(m0 - 1, m0 + 9):
            (seen,) = await r.at_minute(minute)
            if minute % 2:
                await r.at_minute(minute, 40.0)  # a second look in the same minute changes nothing
            ready.append(seen.replicas)
        assert ready == [0, 0, 1, 1, 3, 3, 2, 2, 0, 0]
        (m,) = await r.measured()
        bill = r.fleet.bill_v2_pusd(m0 + 8)
        assert [e["billed_pusd"] for e in r.fleet.bill_v2(m0 + 8)] == [
            54_166_666_667,
            54_166_666_667,
            162_500_000_000,
            162_500_000_000,
            108_333_333_333,
            108_333_333_333,
        ]
        assert m.cost_pusd == bill == 650_000_000_000  # 12 replica-minutes x 325 cents / 60
        assert (m.minutes, m.known_minutes, m.replica_minutes, m.unobserved_minutes) == (10, 10, 12, 0)
        assert m.prices_per_hour == (Decimal(325),) and m.prices == ()
        assert "at 325 cents/hour" in m.basis
        assert r.follower.metrics.cost_pusd[ep.id] == bill
        paths = [s["path"] for s in r.sim.seen]
        assert paths.count("/v2/public/inference-instance-types") == 1 and "/v1/hardware" not in paths
        assert not any(p.startswith("/v1/endpoints") for p in paths)


async def test_a_decimal_hourly_price_is_billed_exactly_and_discovery_lists_the_project(
    tmp_path: Path,
) -> None:
    """A price with decimals (JSON number text -> Decimal, never a float) on 1 then 2 replicas of
    H100, found by discovery: the ledger equals the bill, rounded once per minute row."""
    async with rig(tmp_path) as r:
        r.fleet.cents_per_hour[H100] = Decimal("239.123456789")
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, H100, [(0, 1), (3, 2)], start_minute=m0)
        r.follower.config = lambda: v2(r.config, discover=True)
        for minute in range(m0, m0 + 6):
            await r.at_minute(minute)
        (m,) = await r.measured()
        bill = r.fleet.bill_v2_pusd(m0 + 5)
        per = Fraction(Decimal("239.123456789")) * 10**10 / 60
        assert m.cost_pusd == bill == 3 * round_half_up(per) + 3 * round_half_up(2 * per)
        assert m.endpoint_id == ep.id and m.prices_per_hour == (Decimal("239.123456789"),)


async def test_an_unlisted_instance_type_is_unknown_and_asked_again_once_a_minute(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, A100, [(0, 2)], start_minute=m0)
        del r.fleet.cents_per_hour[A100]
        r.follower.config = lambda: v2(r.config, ep.id)
        for second in (1, 30):
            (seen,) = await r.at_minute(m0, second)
            assert (seen.replicas, seen.cost_pusd) == (2, None)
        gets = [s["path"] for s in r.sim.seen].count("/v2/public/inference-instance-types")
        assert gets == 1
        r.fleet.cents_per_hour[A100] = Decimal(325)
        await r.at_minute(m0 + 1, 1)  # asked again a minute later, priced from the next look on
        (seen,) = await r.at_minute(m0 + 1, 30)
        assert seen.cost_pusd == 108_333_333_333
        (m,) = await r.measured()
        assert (m.minutes, m.known_minutes, m.cost_pusd) == (2, 1, 108_333_333_333)
