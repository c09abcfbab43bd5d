"""proxy/core/budgets.py: periods, admission at the limit, reservations, rollover, thresholds."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.budgets import Budget, BudgetBook, BudgetExceeded, Crossing, Periods, projected_month_end
from proxy.ledger import LedgerRow

NOV = "2026-11"
DEC = "2026-12"
ALERTS = (Decimal("0.5"), Decimal("0.8"), Decimal("1.0"))


def us(*args: int, tz: str = "UTC") -> int:
    """Microseconds since the epoch of a wall-clock time in `tz`."""
    return int(dt.datetime(*args, tzinfo=dt.UTC if tz == "UTC" else Periods(tz).zone).timestamp()) * 10**6


def row(
    cost: int | None,
    reserved: int | None,
    *,
    tenant: str = "acme",
    feature: str | None = None,
    period: str = NOV,
    status: str = "ok",
) -> LedgerRow:
    """A terminal ledger row as the relay hands it to BudgetBook.settle."""
    return LedgerRow(
        "req_test",
        tenant,
        "abcd1234",
        "m",
        "chat",
        "serverless",
        feature,
        None,
        False,
        0,
        period,
        status=status,
        cost_pusd=cost,
        reserved_pusd=reserved,
    )


def book(*budgets: tuple[str, str | None, Budget], period: str = NOV) -> BudgetBook:
    b = BudgetBook({(t, f): budget for t, f, budget in budgets}, Periods())
    b.reset(period, [])
    return b


def state(b: BudgetBook, tenant: str = "acme", feature: str | None = None) -> tuple[int, int]:
    """(spent, reserved) of one budget."""
    _, spent, reserved = b.snapshot()[(tenant, feature)]
    return spent, reserved


# -- periods ------------------------------------------------------------------------------------


def test_utc_period_changes_exactly_at_midnight_utc() -> None:
    """In UTC the last microsecond of November is November and the next one is December."""
    p = Periods()
    dec_1 = us(2026, 12, 1)
    assert p.of(dec_1 - 1) == NOV
    assert p.of(dec_1) == DEC


def test_utc_period_rolls_over_the_year() -> None:
    """31 December belongs to the old year's December, 1 January to the new year."""
    p = Periods()
    jan_1 = us(2027, 1, 1)
    assert p.of(jan_1 - 1) == "2026-12"
    assert p.of(jan_1) == "2027-01"


def test_zoned_period_follows_local_midnight_not_utc() -> None:
    """In America/New_York the month changes at local midnight (05:00 UTC in winter)."""
    p = Periods("America/New_York")
    local_midnight = us(2026, 12, 1, tz="America/New_York")
    assert local_midnight == us(2026, 12, 1, 5)
    assert p.of(local_midnight - 1) == NOV
    assert p.of(local_midnight) == DEC
    assert p.of(us(2026, 12, 1, 3)) == NOV  # already December in UTC, still November in New York
    assert Periods().of(us(2026, 12, 1, 3)) == DEC


def test_february_bounds_in_a_leap_year() -> None:
    """February 2028 runs 29 days, from 1 February to 1 March."""
    start, end = Periods().bounds("2028-02")
    assert start == dt.datetime(2028, 2, 1, tzinfo=dt.UTC).timestamp()
    assert end == dt.datetime(2028, 3, 1, tzinfo=dt.UTC).timestamp()
    assert end - start == 29 * 86400
    assert Periods().bounds("2027-02")[1] - Periods().bounds("2027-02")[0] == 28 * 86400


def test_zoned_bounds_are_local_midnights_across_a_dst_change() -> None:
    """March 2026 in New York starts at 05:00 UTC and ends at 04:00 UTC (DST began): 1 h short."""
    p = Periods("America/New_York")
    start, end = p.bounds("2026-03")
    assert start == us(2026, 3, 1, 5) / 1e6
    assert end == us(2026, 4, 1, 4) / 1e6
    assert end - start == 31 * 86400 - 3600
    assert p.of(int(start * 1e6)) == "2026-03"
    assert p.of(int(end * 1e6) - 1) == "2026-03"
    assert p.of(int(end * 1e6)) == "2026-04"


# -- admission ----------------------------------------------------------------------------------


def test_hard_budget_admits_up_to_exactly_the_budget() -> None:
    """spent + reserved + amount == budget is admitted; one pico-USD more is refused."""
    b = BudgetBook({("acme", None): Budget(1000, hard_limit=True)}, Periods())
    b.reset(NOV, [("acme", None, 300)])
    b.admit("acme", None, NOV, 200)
    b.admit("acme", None, NOV, 500)  # 300 + 200 + 500 == 1000
    assert state(b) == (300, 700)
    with pytest.raises(BudgetExceeded):
        b.admit("acme", None, NOV, 1)
    assert state(b) == (300, 700)  # a refused request reserves nothing


def test_one_pico_over_the_budget_is_refused_from_empty() -> None:
    """A single request costing one pico-USD more than the whole budget is refused."""
    b = book(("acme", None, Budget(1000, hard_limit=True)))
    with pytest.raises(BudgetExceeded):
        b.admit("acme", None, NOV, 1001)
    b.admit("acme", None, NOV, 1000)


def test_refusal_is_a_429_naming_the_period_and_the_remaining_budget() -> None:
    """The error is 429 insufficient_quota/budget_exceeded with the period and what is left."""
    b = BudgetBook({("acme", None): Budget(10**12, hard_limit=True)}, Periods())  # $1
    b.reset(NOV, [("acme", None, 75 * 10**10)])  # $0.75 spent
    with pytest.raises(BudgetExceeded) as info:
        b.admit("acme", None, NOV, 30 * 10**10)  # $0.30
    exc = info.value
    assert (exc.status, exc.type, exc.code) == (429, "insufficient_quota", "budget_exceeded")
    message = str(exc)
    assert "'acme'" in message and NOV in message
    assert "remaining $0.250000" in message and "up to $0.300000" in message


def test_refusal_shows_a_small_budget_exactly() -> None:
    """A budget under one cent is shown as it is ($0.001), not rounded to $0.00."""
    b = book(("acme", "search", Budget(10**9, hard_limit=True)))
    with pytest.raises(BudgetExceeded) as info:
        b.admit("acme", "search", NOV, 10**9 + 1)
    assert "budget $0.001," in str(info.value)


def test_soft_budget_never_refuses() -> None:
    """A soft budget admits any amount, far past the budget, and still counts the reservation."""
    b = book(("acme", None, Budget(1000, hard_limit=False)))
    b.admit("acme", None, NOV, 10**9)
    b.admit("acme", None, NOV, 10**9)
    assert state(b) == (0, 2 * 10**9)


def test_tenant_without_budget_is_never_refused() -> None:
    """Requests of a tenant with no budget are admitted and reserve nowhere."""
    b = book(("acme", None, Budget(0, hard_limit=True)))
    b.admit("globex", None, NOV, 10**15)
    assert ("globex", None) not in b.snapshot()
    with pytest.raises(BudgetExceeded):
        b.admit("acme", None, NOV, 1)


def test_feature_budget_refuses_independently_of_the_tenant_budget() -> None:
    """The feature's own hard budget refuses its requests while the tenant has room."""
    b = book(
        ("acme", None, Budget(10**6, hard_limit=True)),
        ("acme", "search", Budget(100, hard_limit=True)),
    )
    b.admit("acme", "search", NOV, 100)
    with pytest.raises(BudgetExceeded) as info:
        b.admit("acme", "search", NOV, 1)
    assert "'acme/search'" in str(info.value)
    b.admit("acme", "chat", NOV, 1000)  # another feature: only the tenant budget applies
    b.admit("acme", None, NOV, 1000)
    assert state(b) == (0, 2100)
    assert state(b, feature="search") == (0, 100)


def test_tenant_budget_refuses_a_feature_request_whose_feature_budget_has_room() -> None:
    """Both budgets must admit; when the tenant budget refuses, neither reserves anything."""
    b = book(
        ("acme", None, Budget(500, hard_limit=True)),
        ("acme", "search", Budget(10**6, hard_limit=True)),
    )
    with pytest.raises(BudgetExceeded) as info:
        b.admit("acme", "search", NOV, 501)
    assert "'acme'" in str(info.value)
    assert state(b) == (0, 0)
    assert state(b, feature="search") == (0, 0)


def test_soft_feature_budget_does_not_refuse_under_a_hard_tenant_budget() -> None:
    """A soft feature budget reserves but never refuses; the hard tenant budget still does."""
    b = book(
        ("acme", None, Budget(1000, hard_limit=True)),
        ("acme", "search", Budget(10, hard_limit=False)),
    )
    b.admit("acme", "search", NOV, 1000)
    assert state(b, feature="search") == (0, 1000)
    with pytest.raises(BudgetExceeded):
        b.admit("acme", "search", NOV, 1)


# -- settling -----------------------------------------------------------------------------------


def test_settle_swaps_the_reservation_for_the_actual_cost_in_both_budgets() -> None:
    """A settled row releases its reservation and adds its cost to tenant and feature budgets."""
    b = book(
        ("acme", None, Budget(10**6, hard_limit=True)),
        ("acme", "search", Budget(10**6, hard_limit=True)),
    )
    b.admit("acme", "search", NOV, 700)
    b.admit("acme", "search", NOV, 300)
    b.settle(row(120, 700, feature="search"))
    assert state(b) == (120, 300)
    assert state(b, feature="search") == (120, 300)
    b.settle(row(300, 300, feature="search"))
    assert state(b) == (420, 0)
    assert state(b, feature="search") == (420, 0)
    assert b.spent_all == {"acme": 420}
    assert b.reserved_total() == 0


def test_release_returns_a_reservation_without_spending() -> None:
    """release() (a request never forwarded) gives the reservation back and counts no cost."""
    b = book(
        ("acme", None, Budget(1000, hard_limit=True)),
        ("acme", "search", Budget(1000, hard_limit=True)),
    )
    b.admit("acme", "search", NOV, 1000)
    b.release("acme", "search", 1000)
    assert state(b) == (0, 0)
    assert state(b, feature="search") == (0, 0)
    b.admit("acme", "search", NOV, 1000)  # the whole budget is available again


def test_unpriced_row_releases_and_adds_no_cost() -> None:
    """A row of unknown cost (an unpriced model) counts nothing towards spend."""
    b = book(("acme", None, Budget(1000, hard_limit=True)))
    b.admit("acme", None, NOV, 0)
    assert b.settle(row(None, None)) == []
    assert state(b) == (0, 0)
    assert "acme" not in b.spent_all


def test_row_charged_at_its_reservation_counts_the_reservation() -> None:
    """A row whose usage can never be learnt (cost = reservation) spends the whole reservation."""
    b = book(("acme", None, Budget(1000, hard_limit=True)))
    b.admit("acme", None, NOV, 400)
    b.settle(row(400, 400, status="upstream_timeout"))
    assert state(b) == (400, 0)


def test_settle_of_a_row_from_another_period_releases_but_does_not_count() -> None:
    """A November row settling in December frees its reservation; its cost is not December's."""
    b = book(("acme", None, Budget(1000, hard_limit=True)), period=DEC)
    b.admit("acme", None, DEC, 500)
    assert b.settle(row(900, 500, period=NOV)) == []
    assert state(b) == (0, 0)
    assert "acme" not in b.spent_all


def test_spend_of_tenants_without_budget_is_tracked() -> None:
    """spent_all (the month-to-date gauge) covers every tenant, with a budget or not."""
    b = book(("acme", None, Budget(1000)))
    b.settle(row(7, 0, tenant="globex"))
    b.settle(row(5, 0))
    assert b.spent_all == {"globex": 7, "acme": 5}


# -- rollover -----------------------------------------------------------------------------------


def test_admit_in_a_new_period_resets_spend_and_keeps_reservations_in_flight() -> None:
    """The first admission of December starts spend at 0; November's requests stay reserved."""
    b = BudgetBook({("acme", None): Budget(1000, hard_limit=True)}, Periods())
    b.reset(NOV, [("acme", None, 800)])
    b.admit("acme", None, NOV, 150)  # a November request, still running at midnight
    with pytest.raises(BudgetExceeded):
        b.admit("acme", None, NOV, 51)
    b.admit("acme", None, DEC, 500)  # December: 0 spent + 150 + 500 reserved
    assert b.period == DEC
    assert state(b) == (0, 650)
    with pytest.raises(BudgetExceeded):
        b.admit("acme", None, DEC, 351)  # the November reservation still holds room
    b.settle(row(140, 150, period=NOV))  # November's request ends: released, not counted
    assert state(b) == (0, 500)
    b.settle(row(420, 500, period=DEC))
    assert state(b) == (420, 0)
    assert b.spent_all == {"acme": 420}
    b.admit("acme", None, DEC, 580)  # exactly what is left


def test_roll_drops_spend_of_every_tenant() -> None:
    """roll() starts a period from zero for tenants with and without budgets."""
    b = BudgetBook({("acme", None): Budget(1000)}, Periods())
    b.reset(NOV, [("acme", None, 10), ("globex", None, 20)])
    b.roll(DEC)
    assert b.period == DEC
    assert b.spent_all == {}
    assert state(b) == (0, 0)


# -- thresholds ---------------------------------------------------------------------------------


def test_due_returns_each_threshold_once_per_period() -> None:
    """Crossing 0.5, then 0.8, fires each once; nothing fires again until the next period."""
    b = book(("acme", None, Budget(1000, alert_at=ALERTS)))
    assert b.settle(row(499, 0)) == []
    assert b.settle(row(1, 0)) == [Crossing("acme", None, NOV, Decimal("0.5"), 1000, 500)]
    assert b.settle(row(1, 0)) == []
    assert [c.threshold for c in b.settle(row(299, 0))] == [Decimal("0.8")]
    assert b.due() == []
    b.admit("acme", None, DEC, 0)  # December begins
    assert b.settle(row(600, 0, period=DEC)) == [Crossing("acme", None, DEC, Decimal("0.5"), 1000, 600)]


def test_one_large_row_crosses_several_thresholds_at_once() -> None:
    """A jump past several thresholds returns one crossing for each, in order."""
    b = book(("acme", None, Budget(1000, alert_at=ALERTS)))
    crossings = b.settle(row(1200, 0))
    assert [c.threshold for c in crossings] == list(ALERTS)
    assert {c.spent_pusd for c in crossings} == {1200}


def test_feature_budget_crossings_name_the_feature() -> None:
    """A feature budget crosses its own thresholds, reported with its feature."""
    b = book(
        ("acme", None, Budget(10_000, alert_at=ALERTS)),
        ("acme", "search", Budget(100, alert_at=ALERTS)),
    )
    crossings = b.settle(row(50, 0, feature="search"))
    assert crossings == [Crossing("acme", "search", NOV, Decimal("0.5"), 100, 50)]


def test_zero_budget_never_crosses() -> None:
    """A budget of $0 has no meaningful thresholds: nothing is reported."""
    b = book(("acme", None, Budget(0, alert_at=ALERTS)))
    assert b.settle(row(10, 0)) == []


def test_mark_notified_suppresses_thresholds_delivered_before_a_restart() -> None:
    """Thresholds the ledger says were delivered are not returned again."""
    b = BudgetBook({("acme", None): Budget(1000, alert_at=ALERTS)}, Periods())
    b.reset(NOV, [("acme", None, 850)])
    b.mark_notified("acme", None, [Decimal("0.5")])
    assert [c.threshold for c in b.due()] == [Decimal("0.8")]


# -- state from the ledger and from config --------------------------------------------------------


def test_reset_sums_ledger_rows_per_tenant_and_feature() -> None:
    """reset() adds each (tenant, feature, cost) to the tenant budget and its feature budget."""
    b = BudgetBook(
        {("acme", None): Budget(10**6), ("acme", "search"): Budget(10**6)},
        Periods(),
    )
    b.reset(NOV, [("acme", None, 100), ("acme", "search", 200), ("acme", "chat", 5), ("globex", None, 50)])
    assert state(b) == (305, 0)
    assert state(b, feature="search") == (200, 0)
    assert b.spent_all == {"acme": 305, "globex": 50}


def test_reset_keeps_reservations_in_flight() -> None:
    """Reloading spend from the ledger does not forget requests still running."""
    b = book(("acme", None, Budget(1000, hard_limit=True)))
    b.admit("acme", None, NOV, 400)
    b.reset(NOV, [("acme", None, 100)])
    assert state(b) == (100, 400)


def test_configure_keeps_spend_and_reservations() -> None:
    """A reload changes the budget amount; spent and reserved carry over and apply at once."""
    b = book(("acme", None, Budget(1000, hard_limit=True)))
    b.admit("acme", None, NOV, 300)
    b.settle(row(200, 300))
    b.admit("acme", None, NOV, 100)
    b.configure({("acme", None): Budget(400, hard_limit=True)})
    budget, spent, reserved = b.snapshot()[("acme", None)]
    assert (budget.monthly_pusd, spent, reserved) == (400, 200, 100)
    b.admit("acme", None, NOV, 100)
    with pytest.raises(BudgetExceeded):
        b.admit("acme", None, NOV, 1)


def test_configure_keeps_delivered_thresholds_and_fires_new_ones() -> None:
    """After a reload, thresholds already reported stay quiet; a newly added lower one fires."""
    b = book(("acme", None, Budget(1000, alert_at=ALERTS)))
    assert [c.threshold for c in b.settle(row(600, 0))] == [Decimal("0.5")]
    b.configure({("acme", None): Budget(1000, alert_at=(Decimal("0.3"), *ALERTS))})
    assert [c.threshold for c in b.due()] == [Decimal("0.3")]


def test_configure_removing_a_budget_keeps_its_reservation_settleable() -> None:
    """A budget removed by a reload stops limiting; its requests in flight still settle cleanly."""
    b = book(("acme", None, Budget(1000, hard_limit=True)))
    b.admit("acme", None, NOV, 600)
    b.configure({})
    assert b.snapshot() == {}
    b.admit("acme", None, NOV, 10**9)  # no budget any more
    b.settle(row(500, 600))
    b.configure({("acme", None): Budget(1000, hard_limit=True)})
    assert state(b) == (500, 10**9)


def test_new_budget_added_by_configure_starts_without_spend_until_the_next_reset() -> None:
    """configure() does not read the ledger: a new budget counts spend from the reload on."""
    b = book(("acme", None, Budget(1000)))
    b.settle(row(70, 0, tenant="globex"))
    b.configure({("acme", None): Budget(1000), ("globex", None): Budget(1000)})
    assert state(b, tenant="globex") == (0, 0)
    assert b.spent_all["globex"] == 70


def test_refresh_takes_the_shared_spend_and_keeps_local_reservations() -> None:
    """refresh() replaces spend by a shared ledger's (all replicas), keeps reservations and notified."""
    b = book(("acme", None, Budget(1000, alert_at=ALERTS)), ("acme", "search", Budget(100, hard_limit=True)))
    b.admit("acme", "search", NOV, 40)
    assert [c.threshold for c in b.settle(row(600, 0))] == [Decimal("0.5")]
    b.refresh(NOV, [("acme", None, 900), ("acme", "search", 70), ("globex", None, 5)])
    assert (state(b), state(b, feature="search")) == ((900, 40), (70, 40))
    assert b.spent_all == {"acme": 900, "globex": 5}
    # the tenant's 0.5 was notified already; the feature's 70 % of 100 crosses its 0.5 now
    assert [(c.feature, c.threshold) for c in b.due()] == [(None, Decimal("0.8")), ("search", Decimal("0.5"))]
    with pytest.raises(BudgetExceeded, match="'acme/search'"):
        b.admit("acme", "search", NOV, 31)  # 70 spent + 40 reserved + 31 > 100
    b.refresh(DEC, [])  # a new period: spend from zero, reservations in flight stay
    assert (b.period, state(b), b.spent_all) == (DEC, (0, 40), {})


# -- projection ---------------------------------------------------------------------------------


def test_projection_scales_spend_by_the_elapsed_share_of_the_period() -> None:
    """$1 after 10 of November's 30 days projects to $3; half of leap February doubles."""
    periods = Periods()
    nov_start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()
    assert projected_month_end(10**12, NOV, periods, nov_start + 10 * 86400) == 3 * 10**12
    feb_start = dt.datetime(2028, 2, 1, tzinfo=dt.UTC).timestamp()
    assert projected_month_end(500, "2028-02", periods, feb_start + 14.5 * 86400) == 1000


def test_projection_after_the_period_is_the_spend_itself() -> None:
    """Once the period is over the projection is what was spent."""
    _, end = Periods().bounds(NOV)
    assert projected_month_end(12345, NOV, Periods(), end + 86400) == 12345


def test_projection_at_the_first_second_extrapolates_one_second() -> None:
    """Right at the start the elapsed time is floored at one second (no division by zero)."""
    start, end = Periods().bounds(NOV)
    assert projected_month_end(1, NOV, Periods(), start) == int(end - start)


# -- the hard-limit invariant -------------------------------------------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["admit", "settle", "release"]),
        st.sampled_from([None, "search", "chat"]),
        st.integers(0, 1200),
        st.floats(0, 1),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.integers(0, 600),
    operations,
    st.booleans(),
)
def test_hard_budget_never_overspends_when_costs_stay_within_reservations(
    tenant_budget: int,
    feature_budget: int,
    initial: int,
    ops: list[tuple[str, str | None, int, float]],
    roll: bool,
) -> None:
    """Admits, settles (cost <= reservation) and releases keep spent + reserved <= every hard budget."""
    initial = min(initial, tenant_budget)
    b = BudgetBook(
        {
            ("acme", None): Budget(tenant_budget, hard_limit=True),
            ("acme", "search"): Budget(feature_budget, hard_limit=True),
        },
        Periods(),
    )
    b.reset(NOV, [("acme", None, initial)])
    in_flight: list[tuple[str | None, int, str]] = []
    period = NOV
    for i, (op, feature, amount, share) in enumerate(ops):
        if roll and i == len(ops) // 2:
            period = DEC  # a month boundary in the middle of the traffic
        if op == "admit":
            try:
                b.admit("acme", feature, period, amount)
            except BudgetExceeded:
                continue
            in_flight.append((feature, amount, period))
        elif in_flight:
            feature, reserved, started = in_flight.pop(int(share * (len(in_flight) - 1)))
            if op == "release":
                b.release("acme", feature, reserved)
            else:
                b.settle(row(int(reserved * share), reserved, feature=feature, period=started))
        for (_, f), (budget, spent, res) in b.snapshot().items():
            assert spent + res <= budget.monthly_pusd, (f, spent, res)
    for feature, reserved, started in in_flight:
        b.settle(row(reserved, reserved, feature=feature, period=started))
    assert all(res == 0 for _, _, res in b.snapshot().values())
