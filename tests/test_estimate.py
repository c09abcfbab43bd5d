"""How estimates are shown and asked for (proxy/core/estimate.py); the arithmetic is in test_report.py."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from proxy.config.prices import load_price_table
from proxy.core.estimate import EstimateParams, money, per_request_money, plan_estimates
from proxy.core.report import ReportError

PRICES = load_price_table(Path(__file__).resolve().parent.parent / "config" / "prices.yaml")
SEED_MODEL = "arcee-ai/maestro-reasoning"
V3 = "deepseek-ai/DeepSeek-V3"


@pytest.mark.parametrize(
    ("pusd", "monthly", "per_request"),
    [
        (12_000 * 10**12, "$12,000.00", "$12,000.000000"),
        (2_187_500_000_000_000, "$2,187.50", "$2,187.500000"),
        (6_000_000_000, "$0.01", "$0.006000"),
        (39_600_000, "<$0.01", "$0.000040"),
        (1, "<$0.01", "<$0.000001"),
        (0, "$0.00", "$0.000000"),
    ],
)
def test_money_has_one_precision_whatever_the_amount(pusd: int, monthly: str, per_request: str) -> None:
    """Months to the cent and requests to 6 decimals, always; a non-zero amount is never '$0'."""
    assert money(pusd) == monthly
    assert per_request_money(Fraction(pusd)) == per_request


def test_estimate_rows_of_very_different_sizes_show_the_same_decimals() -> None:
    """A large and a tiny estimate side by side: every money cell has the same number of decimals."""
    big = plan_estimates(
        PRICES,
        EstimateParams(model=SEED_MODEL, requests_per_month=2_000_000, input_tokens=3000, output_tokens=1000),
    )[0]
    tiny = plan_estimates(
        PRICES, EstimateParams(model=SEED_MODEL, requests_per_month=40, input_tokens=16, output_tokens=29)
    )[0]
    per_request = [per_request_money(e.per_request) for e in (big, tiny)]
    monthly = [money(e.monthly) for e in (big, tiny)]
    assert per_request == ["$0.006000", "$0.000110"] and monthly == ["$12,000.00", "<$0.01"]
    assert {len(c.rsplit(".", 1)[1]) for c in per_request} == {6}
    assert {len(c.rsplit(".", 1)[1]) for c in monthly} == {2}


def test_compare_alone_is_enough_for_given_traffic() -> None:
    """Without a model, --compare names the models; with neither, the error says so."""
    traffic = {"requests_per_month": 2_000_000, "input_tokens": 3000, "output_tokens": 1000}
    found = plan_estimates(PRICES, EstimateParams(compare=(SEED_MODEL, V3), **traffic))
    assert [(e.model, e.monthly) for e in found] == [(SEED_MODEL, 12_000 * 10**12), (V3, 10_000 * 10**12)]
    with pytest.raises(ReportError, match="model \\(or compare\\)"):
        plan_estimates(PRICES, EstimateParams(**traffic))
