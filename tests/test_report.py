"""Report, forecast and estimate arithmetic (proxy/core/report.py, estimate.py), without a server."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.prices import load_price_table
from proxy.core.budgets import Periods
from proxy.core.estimate import (
    EstimateParams,
    blended_rate,
    break_even_tokens,
    dedicated_monthly_pusd,
    estimate,
    given_traffic,
    measured_traffic,
    measuring_window,
    params_from_mapping,
    parse_window,
    plan_estimates,
    summary,
)
from proxy.core.pricing import PriceTable, Rates
from proxy.core.report import GROUPINGS, ReportError, build_report, forecast, report_csv, report_view
from proxy.core.rollups import rollup_rows
from proxy.ledger import IN_FLIGHT, LedgerRow
from tests.test_docs import ROOT

SEED_MODEL = "arcee-ai/maestro-reasoning"
PRICES = load_price_table(ROOT / "config" / "prices.yaml")
NOV_START_US = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
DAY_US = 86_400_000_000
STATUSES = ("ok", "ok", "ok", "rejected", "upstream_error", "client_aborted", IN_FLIGHT)


def row(i: int, **kw: object) -> LedgerRow:
    base: dict[str, object] = {
        "request_id": f"req_{i}",
        "tenant": "acme",
        "key_id": "k",
        "model": SEED_MODEL,
        "endpoint": "chat",
        "mode": "serverless",
        "feature": None,
        "environment": None,
        "stream": False,
        "started_us": NOV_START_US + i,
        "period": "2026-11",
        "status": "ok",
    }
    base.update(kw)
    return LedgerRow(**base)  # type: ignore[arg-type]


@st.composite
def ledgers(draw: st.DrawFn) -> list[LedgerRow]:
    n = draw(st.integers(0, 40))
    out = []
    for i in range(n):
        tokens = draw(st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))))
        out.append(
            row(
                i,
                tenant=draw(st.sampled_from(["acme", "globex", "initech"])),
                model=draw(st.sampled_from([SEED_MODEL, "m/b", "m/c"])),
                feature=draw(st.sampled_from([None, "chat", "search"])),
                environment=draw(st.sampled_from([None, "prod", "dev"])),
                started_us=NOV_START_US + draw(st.integers(0, 29 * DAY_US)),
                status=draw(st.sampled_from(STATUSES)),
                prompt_tokens=None if tokens is None else tokens[0],
                completion_tokens=None if tokens is None else tokens[1],
                usage_source=draw(st.sampled_from(["upstream", "estimated", "none"])),
                cost_pusd=draw(st.one_of(st.none(), st.integers(0, 10**15))),
            )
        )
    return out


@settings(max_examples=60, deadline=None)
@given(ledgers(), st.sampled_from(GROUPINGS))
def test_report_totals_equal_the_sum_of_rows_exactly(rows: list[LedgerRow], by: str) -> None:
    """For every grouping, groups and total sum exactly to the terminal rows; in-flight is excluded."""
    report = build_report(rows, "2026-11", by)
    terminal = [r for r in rows if r.status != IN_FLIGHT]
    cost = sum(r.cost_pusd for r in terminal if r.cost_pusd is not None)
    assert report.total.requests == len(terminal) == sum(g.requests for g in report.groups)
    assert report.total.input_tokens == sum(r.prompt_tokens or 0 for r in terminal)
    assert report.total.output_tokens == sum(r.completion_tokens or 0 for r in terminal)
    assert report.total.cost_pusd == cost == sum(g.cost_pusd for g in report.groups)
    assert sum(g.input_tokens for g in report.groups) == report.total.input_tokens
    unknown = [r for r in terminal if r.cost_pusd is None and r.status != "rejected"]
    assert report.total.cost_unknown == len(unknown) == sum(g.cost_unknown for g in report.groups)
    assert report.total.estimated == sum(r.usage_source == "estimated" for r in terminal)
    assert report.total.rejected == sum(r.status == "rejected" for r in terminal)


@settings(max_examples=40, deadline=None)
@given(ledgers(), st.sampled_from(GROUPINGS))
def test_csv_and_json_parse_back_to_the_same_numbers(rows: list[LedgerRow], by: str) -> None:
    """CSV lines and JSON groups carry the exact integer counts and decimal costs of the report."""
    report = build_report(rows, "2026-11", by)
    view = json.loads(json.dumps(report_view(report)))
    lines = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert len(lines) == len(report.groups) + 1
    for g, js, line in zip(
        [*report.groups, report.total], [*view["groups"], view["total"]], lines, strict=True
    ):
        assert js["requests"] == int(line["requests"]) == g.requests
        assert js["input_tokens"] == int(line["input_tokens"]) == g.input_tokens
        assert js["output_tokens"] == int(line["output_tokens"]) == g.output_tokens
        assert Decimal(js["cost_usd"]) == Decimal(line["cost_usd"]) == Decimal(g.cost_pusd).scaleb(-12)
        assert int(line["cost_unknown"]) == js["cost_unknown"] == g.cost_unknown
    total = Decimal(view["total"]["cost_usd"])
    assert sum((Decimal(g["cost_usd"]) for g in view["groups"]), Decimal(0)) == total


def test_report_keeps_other_months_and_tenants_out_and_groups_by_day() -> None:
    """Only the month's rows (and the tenant's, if given) count; `day` groups by local date."""
    rows = [
        row(1, cost_pusd=10),
        row(2, cost_pusd=20, tenant="globex"),
        row(3, cost_pusd=40, period="2026-10"),
        row(4, cost_pusd=80, started_us=NOV_START_US + DAY_US),
    ]
    report = build_report(rows, "2026-11", "day", tenant="acme")
    assert [(g.key, g.cost_pusd) for g in report.groups] == [("2026-11-01", 10), ("2026-11-02", 80)]
    berlin = build_report(rows, "2026-11", "day", periods=Periods("America/New_York"))
    assert berlin.groups[0].key == "2026-10-31"
    with pytest.raises(ReportError):
        build_report(rows, "2026-13", "model")
    with pytest.raises(ReportError):
        build_report(rows, "2026-11", "colour")


def test_rejected_rows_written_with_cost_zero_count_as_rejected() -> None:
    """A rejected row as the proxy writes it (cost 0) counts as rejected, from rows and from rollups."""
    rows = [
        row(1, cost_pusd=10, prompt_tokens=1, completion_tokens=1),
        row(2, status="rejected", cost_pusd=0, error_code="model_not_priced"),
        row(3, status="rejected", cost_pusd=None),  # as rows written before cost 0 was recorded
    ]
    for report in (
        build_report(rows, "2026-11", "model"),
        build_report([], "2026-11", "model", rollups=rollup_rows(rows, Periods())),
    ):
        t = report.total
        assert (t.requests, t.rejected, t.cost_unknown, t.cost_pusd) == (3, 2, 0, 10)


def test_share_and_averages_are_exact() -> None:
    """Shares and averages come from exact integer ratios, rounded half-up only for display."""
    rows = [
        row(1, cost_pusd=1, prompt_tokens=1, completion_tokens=2),
        row(2, cost_pusd=2, prompt_tokens=2, completion_tokens=2, model="m/b"),
    ]
    view = report_view(build_report(rows, "2026-11", "model"))
    assert [(g["key"], g["share"]) for g in view["groups"]] == [("m/b", "0.6667"), (SEED_MODEL, "0.3333")]
    assert view["total"]["avg_input_tokens"] == "1.5"
    assert view["total"]["avg_cost_usd"] == "0.000000000002"  # 1.5 pico-USD rounds half-up


def test_forecast_is_a_linear_run_rate_over_the_elapsed_month() -> None:
    """Ten days into a 30-day month, $1 spent projects to $3; outside the month there is none."""
    rows = [row(1, cost_pusd=10**12), row(2, cost_pusd=None, status="rejected")]
    now = NOV_START_US / 1e6 + 10 * 86_400
    fc = forecast(rows, "2026-11", now)
    assert fc is not None
    assert fc.lines == (("acme", SEED_MODEL, 10**12, 3 * 10**12),)
    assert "10.00 of 30.00 days" in fc.window
    assert forecast(rows, "2026-10", now) is None


def test_seed_example_exactly() -> None:
    """maestro, 3,000 in / 1,000 out, 2M requests: $0.006, $12,000 Serverless, $6,000 Batch at 50 % off."""
    served = PRICES.get(SEED_MODEL)
    assert served is not None
    rates = replace(
        served, batch="discount", batch_discount=Decimal("0.5"), batch_input=450_000, batch_output=1_650_000
    )
    e = estimate(SEED_MODEL, rates, given_traffic(3000, 1000, 2_000_000))
    assert e.per_request == 6_000_000_000  # pico-USD
    assert e.monthly == 12_000 * 10**12
    assert e.monthly_batch == 6_000 * 10**12
    assert summary(e) == (
        "arcee-ai/maestro-reasoning at $0.90/$3.30, 3,000 in / 1,000 out, 2,000,000 requests/month -> "
        "$0.006000 per request, $12,000.00 per month Serverless, $6,000.00 Batch"
    )


def test_break_even_is_dedicated_monthly_over_the_blended_rate() -> None:
    """$5,000/month over $1.50/1M blended (3:1 of $0.90/$3.30) -> 3,333,333,334 tokens (ceil)."""
    rates = Rates(900_000, 3_300_000, 450_000, 1_650_000)
    blended = blended_rate(rates, Fraction(3000), Fraction(1000))
    assert blended == Fraction(3_000_000, 2)  # pico-USD per token == $1.50 per 1M
    assert break_even_tokens(5_000 * 10**12, blended) == 3_333_333_334
    flat = Rates(1_000_000, 1_000_000, 0, 0)  # $1 per 1M either way
    assert break_even_tokens(2_000 * 10**12, blended_rate(flat, Fraction(1), Fraction(1))) == 2 * 10**9
    assert break_even_tokens(1, Fraction(0)) is None


def test_dedicated_effective_rate_and_gpu_hours() -> None:
    """GPU hourly x GPUs x hours is the monthly cost; effective $/1M = monthly / monthly tokens."""
    monthly = dedicated_monthly_pusd(None, Decimal("3.99"), 2, Decimal("730"))
    assert monthly == 5_825_400_000_000_000  # $5,825.40
    rates = PRICES.get(SEED_MODEL)
    assert rates is not None
    e = estimate(SEED_MODEL, rates, given_traffic(3000, 1000, 2_000_000), dedicated_pusd=5_000 * 10**12)
    assert e.dedicated is not None
    assert e.dedicated.usd_per_mtok == Decimal("0.625")  # $5,000 / 8,000M tokens
    assert e.dedicated.cheaper == "dedicated"
    with pytest.raises(ReportError):
        dedicated_monthly_pusd(None, Decimal(1), None, None)


def test_measured_traffic_scales_the_window_to_30_days() -> None:
    """7 days of 70 requests -> 300 requests a month; averages over rows with usage only."""
    rows = [row(i, prompt_tokens=100 + i % 2, completion_tokens=10) for i in range(70)]
    rows.append(row(99, status="rejected"))  # no usage: not counted
    now = NOV_START_US + 7 * DAY_US  # midnight: the 7-day window is 7 whole days
    t = measured_traffic(rollup_rows(rows, Periods()), measuring_window("7d", now, Periods()))
    assert t is not None
    assert t.requests_per_month == 300
    assert t.input_tokens == Fraction(201, 2)
    assert t.output_tokens == 10
    assert parse_window("24h") == 86_400
    with pytest.raises(ReportError):
        parse_window("7 weeks")


def test_a_measuring_window_is_widened_to_whole_days_and_scaled_by_its_true_length() -> None:
    """7d asked at noon: from midnight 7 days and a half ago; the volume scales by 7.5 days."""
    noon = NOV_START_US + 10 * DAY_US + DAY_US // 2
    window = measuring_window("7d", noon, Periods())
    assert (window.first_day, window.seconds) == ("2026-11-04", Fraction(15, 2) * 86_400)
    rows = [row(i, started_us=NOV_START_US + 3 * DAY_US + i * DAY_US, prompt_tokens=10, completion_tokens=1)
            for i in range(8)]  # fmt: skip
    t = measured_traffic(rollup_rows(rows[1:], Periods()), window)  # 11-04 .. 11-10: 7 rows
    assert t is not None and t.requests_per_month == Fraction(7 * 30, 1) / Fraction(15, 2)
    berlin = measuring_window("24h", NOV_START_US + 12 * 3_600_000_000, Periods("Europe/Berlin"))
    assert (berlin.first_day, berlin.periods) == ("2026-10-31", ("2026-10", "2026-11"))


def test_plan_estimates_compares_models_on_the_same_traffic() -> None:
    """--compare prices the same T_in, T_out and volume on each model."""
    params = params_from_mapping(
        {
            "model": SEED_MODEL,
            "requests_per_month": 2_000_000,
            "input_tokens": 3000,
            "output_tokens": 1000,
            "compare": "deepseek-ai/DeepSeek-V3",
        }
    )
    found = plan_estimates(PRICES, params)
    assert [e.model for e in found] == [SEED_MODEL, "deepseek-ai/DeepSeek-V3"]
    assert found[1].monthly == 10_000 * 10**12  # $1.25 / $1.25 per 1M
    with pytest.raises(ReportError):
        plan_estimates(PRICES, EstimateParams(model=SEED_MODEL))
    with pytest.raises(ReportError):
        params_from_mapping({"model": SEED_MODEL, "requests_per_month": -1})
    with pytest.raises(ReportError):
        plan_estimates(PriceTable({}), params)


def test_plan_estimates_from_the_ledger_one_per_model() -> None:
    """From the ledger without a model, each priced model in the window gets its own estimate."""
    now = NOV_START_US + 7 * DAY_US
    rows = [row(i, prompt_tokens=3000, completion_tokens=1000) for i in range(7)]
    rows.append(row(8, model="deepseek-ai/DeepSeek-V3", prompt_tokens=10, completion_tokens=10))
    rows.append(row(9, started_us=NOV_START_US - DAY_US, prompt_tokens=1, completion_tokens=1))  # too old
    found = plan_estimates(PRICES, EstimateParams(from_ledger=True, window="7d"), rows, now)
    assert [e.model for e in found] == ["arcee-ai/maestro-reasoning", "deepseek-ai/DeepSeek-V3"]
    assert found[0].traffic.requests_per_month == 30
    assert found[0].monthly == 30 * 6_000_000_000


def test_units_other_than_tokens_are_summed_per_unit_in_every_form() -> None:
    """Images and audio rows: their quantities per unit, exact, in JSON and CSV; tokens unaffected."""
    t = 1_767_225_600_000_000
    base = LedgerRow("x", "acme", "k", "flux", "images", "serverless", None, None, False, t,
                     "2026-01", "ok", t + 1, 200, usage_source="derived")  # fmt: skip
    rows = [
        replace(base, request_id="a", cost_pusd=2_831_155_200, unit="megapixel",
                quantity_micros=1_048_576),
        replace(base, request_id="b", cost_pusd=1, unit="megapixel", quantity_micros=3_000_001),
        replace(base, request_id="c", model="sonic", endpoint="audio.speech", cost_pusd=7,
                unit="audio_second", quantity_micros=2_500_000),
        replace(base, request_id="d", model="llama", endpoint="chat", cost_pusd=5, prompt_tokens=3,
                completion_tokens=4, usage_source="upstream"),
    ]  # fmt: skip
    view = report_view(build_report(rows, "2026-01", by="model"))
    by_key = {g["key"]: g for g in view["groups"]}
    assert by_key["flux"]["units"] == {"megapixel": "4.048577"}
    assert by_key["sonic"]["units"] == {"audio_second": "2.5"}
    assert by_key["llama"]["units"] == {} and by_key["llama"]["input_tokens"] == 3
    assert view["total"]["units"] == {"audio_second": "2.5", "megapixel": "4.048577"}
    lines = {r["model"]: r for r in csv.DictReader(io.StringIO(report_csv(build_report(rows, "2026-01"))))}
    assert lines["flux"]["units"] == "megapixel=4.048577" and lines["llama"]["units"] == ""
