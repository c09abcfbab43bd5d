"""proxy/core/videos.py: a video job's row from together's answer (billed at completion, a failed
job never, a vanished one at its bound), and BudgetBook.hold_jobs (a running job's bound)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.budgets import Budget, BudgetBook, BudgetExceeded, Periods
from proxy.core.pricing import Rates
from proxy.core.records import VideoJob
from proxy.core.videos import (
    gone_end,
    is_final,
    job_status,
    video_end,
    video_request_id,
    video_row,
)

PER_SECOND = 400_000_000_000  # $0.40 per second, in pico-USD
VEO = Rates(0, 0, 0, 0, unit="video_second", per_unit=PER_SECOND)


def job(seconds: int | None = 4_500_000, reserved: int | None = 1_800_000_000_000, **kw: object) -> VideoJob:
    fields: dict[object, object] = {
        "video_id": "video-1", "tenant": "acme", "key_id": "k1", "model": "google/veo-3.0",
        "feature": "promo", "environment": "prod", "created_us": 1, "request_id": "req_1",
        "reserved_pusd": reserved, "seconds_micros": seconds, "status": "in_progress",
    }  # fmt: skip
    fields.update(kw)
    return VideoJob(**fields)  # type: ignore[arg-type]


def test_a_running_job_has_no_end() -> None:
    assert video_end({"status": "in_progress", "seconds": "4.5"}, job()) is None
    assert video_end({"id": "video-1"}, job()) is None  # no status: still followed
    assert video_end(None, job()) is None and not is_final(job_status(None))


def test_a_completed_job_is_billed_for_the_seconds_together_states() -> None:
    end = video_end({"status": "completed", "seconds": "6"}, job(seconds=4_500_000))
    assert end is not None
    row = video_row(job(), end, VEO, 1_000, "2026-12")
    assert (row.request_id, row.endpoint, row.status, row.usage_source) == (
        video_request_id("video-1"), "videos", "ok", "upstream",
    )  # fmt: skip
    assert (row.quantity_micros, row.cost_pusd, row.unit) == (6_000_000, 6 * PER_SECOND, "video_second")
    assert (row.tenant, row.feature, row.environment, row.upstream_id) == ("acme", "promo", "prod", "video-1")
    assert row.reserved_pusd == 0 and row.stream_complete and row.period == "2026-12"


def test_without_stated_seconds_the_request_decides_else_the_default_is_an_estimate() -> None:
    end = video_end({"status": "completed"}, job(seconds=2_000_000))
    assert end is not None and (end.quantity.micros, end.quantity.source) == (2_000_000, "derived")
    end = video_end({"status": "COMPLETED"}, job(seconds=None))
    assert end is not None and (end.quantity.micros, end.quantity.source) == (5_000_000, "estimated")


def test_a_failed_job_costs_nothing_even_unpriced() -> None:
    for rates in (VEO, None):
        end = video_end({"status": "failed", "seconds": "8", "error": {"message": "x"}}, job())
        assert end is not None
        row = video_row(job(), end, rates, 1, "2026-12")
        assert (row.status, row.cost_pusd, row.quantity_micros, row.error_code) == (
            "upstream_error", 0, 0, "video_failed",
        )  # fmt: skip


def test_an_unpriced_completed_job_has_an_unknown_cost_never_zero() -> None:
    end = video_end({"status": "completed", "seconds": "3"}, job())
    assert end is not None
    assert video_row(job(), end, None, 1, "2026-12").cost_pusd is None
    per_token = Rates(1, 1, 1, 1)
    assert video_row(job(), end, per_token, 1, "2026-12").cost_pusd is None


def test_a_vanished_job_is_charged_its_bound() -> None:
    row = video_row(job(reserved=123), gone_end(job(reserved=123)), VEO, 1, "2026-12")
    assert (row.status, row.cost_pusd, row.usage_source, row.upstream_status) == (
        "orphaned", 123, "estimated", 404,
    )  # fmt: skip
    assert video_row(job(reserved=None), gone_end(job(reserved=None)), None, 1, "x").cost_pusd is None


@given(
    st.decimals(min_value="0.000001", max_value="60", places=6),
    st.integers(min_value=0, max_value=10**13),
)
def test_cost_is_exact_seconds_times_price_rounded_half_up(seconds: object, per_unit: int) -> None:
    end = video_end({"status": "completed", "seconds": str(seconds)}, job())
    assert end is not None
    rates = Rates(0, 0, 0, 0, unit="video_second", per_unit=per_unit)
    cost = video_row(job(), end, rates, 1, "p").cost_pusd
    exact = Fraction(str(seconds)) * per_unit
    assert cost is not None and abs(Fraction(cost) - exact) <= Fraction(1, 2)
    assert cost == int(exact + Fraction(1, 2))  # half-up, never float


# -- BudgetBook.hold_jobs -------------------------------------------------------------------


def book(pusd: int = 1000) -> BudgetBook:
    b = BudgetBook({("acme", None): Budget(pusd, hard_limit=True)}, Periods("UTC"))
    b.reset("2026-12", ())
    return b


def test_a_held_job_counts_against_a_hard_limit_until_it_is_let_go() -> None:
    b = book()
    b.hold_jobs([("acme", None, 700)])
    with pytest.raises(BudgetExceeded):
        b.admit("acme", None, "2026-12", 400)
    b.admit("acme", None, "2026-12", 300)  # exactly what is left
    assert b.snapshot()[("acme", None)][2] == 1000 and b.reservations() == {("acme", None): 300}
    b.hold_jobs([])  # the job ended
    b.admit("acme", None, "2026-12", 400)


def test_holding_replaces_and_survives_a_new_month_and_a_reload() -> None:
    b = book()
    b.hold_jobs([("acme", "promo", 100), ("acme", None, 200), ("globex", None, 999)])
    b.hold_jobs([("acme", None, 250)])  # replaced, not added
    assert b.reserved_total() == 250
    b.roll("2027-01")
    assert b.reserved_total() == 250  # still running in the new month
    b.configure({("acme", None): Budget(2000, hard_limit=True), ("acme", "promo"): Budget(10, True)})
    assert b.reserved_total() == 250  # a reload keeps holding it, on the new budgets too
    b.hold_jobs([("acme", "promo", 5)])
    assert (b.snapshot()[("acme", None)][2], b.snapshot()[("acme", "promo")][2]) == (5, 5)
