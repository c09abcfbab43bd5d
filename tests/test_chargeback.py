"""Shared dedicated endpoint chargeback (proxy/core/chargeback.py) and its config (dedicated_endpoints)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import DedicatedEndpoint, parse_config
from proxy.core.budgets import Periods
from proxy.core.chargeback import Chargeback, chargeback_csv, chargeback_view, chargebacks, split_by_share
from proxy.core.chargeback import chargeback as chargeback_of
from proxy.core.report import ReportError
from proxy.core.rollups import rollup_rows
from proxy.errors import ConfigError
from proxy.ledger import IN_FLIGHT, LedgerRow
from tests.test_docs import ROOT

MODEL = "arcee-ai/maestro-reasoning"
OTHER = "deepseek-ai/DeepSeek-V3"
NOV_START_US = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
USD = 10**12  # pico-USD


def row(i: int, tenant: str, prompt: int | None, completion: int | None, **kw: object) -> LedgerRow:
    base: dict[str, object] = {
        "request_id": f"req_{i}",
        "tenant": tenant,
        "key_id": "k",
        "model": MODEL,
        "endpoint": "chat",
        "mode": "serverless",
        "feature": None,
        "environment": None,
        "stream": False,
        "started_us": NOV_START_US + i,
        "period": "2026-11",
        "status": "ok",
        "finished_us": NOV_START_US + i + 1000,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "usage_source": "upstream",
        "cost_pusd": None if prompt is None else (prompt * 900_000 + (completion or 0) * 3_300_000),
    }
    base.update(kw)
    return LedgerRow(**base)  # type: ignore[arg-type]


def chargeback(rows: list[LedgerRow], *args: Any) -> Chargeback:
    """The chargeback of these rows, through their rollups (as the ledger keeps them)."""
    return chargeback_of(rollup_rows(rows, Periods()), *args)


def test_hand_computed_example() -> None:
    """$1,000 over 6M / 3M / 1M tokens: $600 / $300 / $100, $100 per 1M each; serverless compared."""
    rows = [
        row(1, "acme", 4_500_000, 1_500_000),
        row(2, "globex", 2_000_000, 1_000_000),
        row(3, "initech", 1_000_000, 0),
        row(4, "initech", 5, 5, model=OTHER),  # another model: not on this endpoint
        row(5, "hooli", None, None, status="rejected"),  # listed, charged 0
        row(6, "acme", 7, 7, period="2026-10"),  # another month
    ]
    cb = chargeback(rows, "2026-11", "reasoning", MODEL, 1000 * USD, "monthly_usd 1000")
    view = chargeback_view(cb)
    got = {t["tenant"]: t for t in view["tenants"]}
    assert [t["tenant"] for t in view["tenants"]] == ["acme", "globex", "initech", "hooli"]
    assert {n: (t["tokens"], t["share"], t["charge_usd"]) for n, t in got.items()} == {
        "acme": (6_000_000, "0.6", "600"),
        "globex": (3_000_000, "0.3", "300"),
        "initech": (1_000_000, "0.1", "100"),
        "hooli": (0, "0", "0"),
    }
    assert got["acme"]["effective_usd_per_mtok"] == "100"
    assert got["hooli"]["effective_usd_per_mtok"] is None
    # Serverless: 4.5M x $0.90 + 1.5M x $3.30 = $4.05 + $4.95 = $9.00
    assert (got["acme"]["serverless_usd"], got["acme"]["serverless_usd_per_mtok"]) == ("9", "1.5")
    assert got["initech"]["serverless_usd"] == "0.9"
    assert (view["tokens"], view["unallocated_usd"], view["effective_usd_per_mtok"]) == (
        10_000_000,
        "0",
        "100",
    )


def test_remainder_goes_to_the_largest_fractions() -> None:
    """10 pico-USD over three equal users: 4 / 3 / 3 (the tie goes to the first tenant by name)."""
    rows = [row(1, "c", 1, 0), row(2, "a", 1, 0), row(3, "b", 1, 0)]
    cb = chargeback(rows, "2026-11", "e", MODEL, 10)
    assert [(line.tenant, line.charge_pusd) for line in cb.lines] == [("a", 4), ("b", 3), ("c", 3)]
    assert split_by_share(100, [1, 1, 1, 97]) == [1, 1, 1, 97]
    assert split_by_share(5, [2, 1]) == [3, 2]  # exact 3.33 / 1.67: the larger remainder gets it


def test_no_tokens_leaves_the_whole_cost_unallocated() -> None:
    """Only errors, in-flight and batch rows: every tenant charged 0, the cost shown as unallocated."""
    rows = [
        row(1, "acme", None, None, status="upstream_error"),
        row(2, "acme", 10, 10, status=IN_FLIGHT),
        row(3, "globex", 10, 10, mode="batch"),
    ]
    cb = chargeback(rows, "2026-11", "e", MODEL, 730 * USD)
    view = chargeback_view(cb)
    assert [(t["tenant"], t["charge_usd"]) for t in view["tenants"]] == [("acme", "0")]
    assert (view["unallocated_usd"], view["allocated_usd"], view["tokens"]) == ("730", "0", 0)
    assert view["effective_usd_per_mtok"] is None
    assert "unallocated,,0,,730" in chargeback_csv([view])
    assert chargeback([], "2026-11", "e", MODEL, 5).unallocated_pusd == 5


def test_client_aborted_rows_count_and_bad_month_is_rejected() -> None:
    """A client_aborted row's billed tokens count; a malformed month is a ReportError."""
    cb = chargeback([row(1, "a", 3, 1, status="client_aborted"), row(2, "b", 1, 3)], "2026-11", "e", MODEL, 8)
    assert [(line.tenant, line.share, line.charge_pusd) for line in cb.lines] == [
        ("a", Fraction(1, 2), 4),
        ("b", Fraction(1, 2), 4),
    ]
    with pytest.raises(ReportError):
        chargeback([], "2026-13", "e", MODEL, 1)


splits = st.lists(
    st.tuples(
        st.sampled_from(["acme", "globex", "initech", "hooli", "umbrella"]),
        st.integers(0, 10**9),
        st.integers(0, 10**9),
        st.sampled_from(["ok", "ok", "client_aborted", "rejected", "upstream_error", IN_FLIGHT]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(splits, st.integers(0, 10**20))
def test_charges_sum_exactly_to_the_monthly_cost(parts: list[Any], monthly: int) -> None:
    """Over any token split, charges add up to the monthly cost exactly and shares to 1."""
    rows = [row(i, t, p, c, status=s) for i, (t, p, c, s) in enumerate(parts)]
    cb = chargeback(rows, "2026-11", "e", MODEL, monthly)
    tokens = sum(p + c for _, p, c, s in parts if s in ("ok", "client_aborted"))
    assert cb.tokens == tokens
    assert sum(line.charge_pusd for line in cb.lines) + cb.unallocated_pusd == monthly
    if tokens:
        assert cb.unallocated_pusd == 0
        assert sum(line.share for line in cb.lines) == 1
        for line in cb.lines:
            exact = Fraction(monthly * line.tokens, tokens)
            assert abs(line.charge_pusd - exact) < 1  # floor or ceil of the exact share
    else:
        assert cb.unallocated_pusd == monthly
        assert all(line.charge_pusd == 0 and line.share == 0 for line in cb.lines)


# -- config -----------------------------------------------------------------------------------


def config_with(endpoints: Any, **top: Any) -> Any:
    data = {
        "prices": str(ROOT / "config" / "prices.yaml"),
        "tenants": {"acme": {}},
        "dedicated_endpoints": endpoints,
        **top,
    }
    return parse_config(data, "c.yaml", Path("."))


def test_config_monthly_and_hourly_cost_exactly() -> None:
    """monthly_usd as given; hourly_usd x hours_per_month (730 unless set), exact to the pico-USD."""
    c = config_with(
        {
            "shared-70b": {"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo", "hourly_usd": 3.36},
            "reasoning": {"model": MODEL, "monthly_usd": "1000.01"},
            "v3": {"model": OTHER, "hourly_usd": 2, "hours_per_month": 720.5},
        }
    )
    assert [(e.name, e.monthly_pusd) for e in c.dedicated_endpoints] == [
        ("shared-70b", 2452_800_000_000_000),
        ("reasoning", 1000_010_000_000_000),
        ("v3", 1441 * USD),
    ]
    assert c.dedicated_endpoints[0].basis == "hourly_usd 3.36 x 730 h"
    assert config_with(None).dedicated_endpoints == ()
    assert len(chargebacks([], "2026-11", c.dedicated_endpoints)) == 3


@pytest.mark.parametrize(
    ("endpoints", "key", "words"),
    [
        ({"e": {"model": MODEL}}, "dedicated_endpoints.e.monthly_usd", "exactly one"),
        (
            {"e": {"model": MODEL, "monthly_usd": 1, "hourly_usd": 1}},
            "dedicated_endpoints.e.monthly_usd",
            "exactly one",
        ),
        ({"e": {"monthly_usd": 1}}, "dedicated_endpoints.e.model", "missing"),
        ({"e": {"model": "x/unpriced", "monthly_usd": 1}}, "dedicated_endpoints.e.model", "no price"),
        ({"e": {"model": MODEL, "monthly_usd": -1}}, "dedicated_endpoints.e.monthly_usd", ">= 0"),
        ({"e": {"model": MODEL, "monthly_usd": "lots"}}, "dedicated_endpoints.e.monthly_usd", ">= 0"),
        ({"e": {"model": MODEL, "hourly_usd": True}}, "dedicated_endpoints.e.hourly_usd", ">= 0"),
        ({"e": {"model": MODEL, "monthly_usd": "1e-13"}}, "dedicated_endpoints.e.monthly_usd", "pico-USD"),
        (
            {"e": {"model": MODEL, "monthly_usd": 1, "hours_per_month": 5}},
            "dedicated_endpoints.e.hours_per_month",
            "only with",
        ),
        (
            {"e": {"model": MODEL, "hourly_usd": 1, "hours_per_month": 745}},
            "dedicated_endpoints.e.hours_per_month",
            "744",
        ),
        ({"e": {"model": MODEL, "monthly_usd": 1, "gpus": 2}}, "dedicated_endpoints.e.gpus", "unknown key"),
        (
            {"e": {"model": MODEL, "monthly_usd": 1}, "f": {"model": MODEL, "monthly_usd": 2}},
            "dedicated_endpoints.f.model",
            "already",
        ),
        ({"bad name!": {"model": MODEL, "monthly_usd": 1}}, "dedicated_endpoints.bad name!", "letters"),
        ({"e": "cheap"}, "dedicated_endpoints.e", "mapping"),
        ([{"model": MODEL}], "dedicated_endpoints", "mapping"),
    ],
)
def test_config_errors_name_file_and_key(endpoints: Any, key: str, words: str) -> None:
    """Each mistake in dedicated_endpoints is a ConfigError naming the file, the key and the problem."""
    with pytest.raises(ConfigError) as err:
        config_with(endpoints)
    assert str(err.value).startswith(f"c.yaml: {key}:"), str(err.value)
    assert words in str(err.value)


def test_unpriced_model_allowed_when_forwarded() -> None:
    """With unpriced_models: forward, an endpoint may serve a model without a Serverless price."""
    c = config_with({"ft": {"model": "acme/fine-tune", "monthly_usd": 10}}, unpriced_models="forward")
    assert c.dedicated_endpoints == (DedicatedEndpoint("ft", "acme/fine-tune", 10 * USD, "monthly_usd 10"),)
