"""Monthly budgets: periods, reservations, hard limits, alert thresholds.

Admission reserves an upper bound of a request's cost before it is forwarded; the reservation is
settled to the actual cost when the request's row becomes terminal (whatever the path: ok,
error, timeout, disconnect, shutdown). In one process the check and the reservation happen in
one synchronous step on the event loop, so concurrent requests cannot overspend between them.
Spend is recomputed from the ledger at start, never carried in process memory alone.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from proxy.core.pricing import format_usd
from proxy.core.records import LedgerRow
from proxy.errors import MeterError

TENANT = None  # the feature key of a tenant-wide budget


class BudgetExceeded(MeterError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"
    retryable = False  # retrying cannot help before the next period or a bigger budget


@dataclass(frozen=True, slots=True)
class Budget:
    """A monthly budget in pico-USD, hard (refuse) or soft (alert only), with thresholds."""

    monthly_pusd: int
    hard_limit: bool = False
    alert_at: tuple[Decimal, ...] = (Decimal("0.5"), Decimal("0.8"), Decimal("1"))


@dataclass(frozen=True, slots=True)
class Periods:
    """Calendar months in a time zone (UTC by default): a request belongs to the one it started in."""

    timezone: str = "UTC"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def of(self, ts_us: int) -> str:
        t = dt.datetime.fromtimestamp(ts_us / 1e6, self.zone)
        return f"{t.year:04d}-{t.month:02d}"

    def bounds(self, period: str) -> tuple[float, float]:
        """Start and end of a period as Unix seconds."""
        year, month = (int(x) for x in period.split("-"))
        start = dt.datetime(year, month, 1, tzinfo=self.zone)
        days = calendar.monthrange(year, month)[1]
        end = start + dt.timedelta(days=days)
        return start.timestamp(), end.timestamp()


@dataclass(slots=True)
class _Account:
    budget: Budget
    spent: int = 0
    reserved: int = 0  # requests in flight
    jobs: int = 0  # video jobs created and not yet ended (hold_jobs)
    notified: set[Decimal] = field(default_factory=set)

    @property
    def remaining(self) -> int:
        return self.budget.monthly_pusd - self.spent - self.reserved - self.jobs


@dataclass(frozen=True, slots=True)
class Crossing:
    """A budget passed one of its alert thresholds in a period."""

    tenant: str
    feature: str | None
    period: str
    threshold: Decimal
    budget_pusd: int
    spent_pusd: int


class BudgetBook:
    """Spend, reservations and limits of the current period, per tenant (and tenant+feature)."""

    def __init__(self, budgets: Mapping[tuple[str, str | None], Budget], periods: Periods) -> None:
        self.periods = periods
        self.period = ""
        self._budgets = dict(budgets)
        self._budget_tenants = {k[0] for k in budgets}
        self._accounts: dict[tuple[str, str | None], _Account] = {}
        self.spent_all: dict[str, int] = {}  # month-to-date per tenant, budget or not
        self._jobs: list[tuple[str, str | None, int]] = []  # running video jobs (hold_jobs)

    # -- state from the ledger --------------------------------------------------------------

    def reset(self, period: str, rows: Iterable[tuple[str, str | None, int]]) -> None:
        """Start `period` from the ledger's (tenant, feature, cost) of its terminal rows.

        Reservations of requests in flight are kept: they settle whenever they end.
        """
        reserved = {k: a.reserved for k, a in self._accounts.items() if a.reserved}
        self.period = period
        self._accounts = {k: _Account(b) for k, b in self._budgets.items()}
        for key, amount in reserved.items():
            acc = self._accounts.get(key)
            if acc is None:  # a budget removed by a reload: keep it settleable
                acc = self._accounts[key] = _Account(Budget(0, False, ()))
            acc.reserved = amount
        self.hold_jobs(self._jobs)
        self.spent_all = {}
        for tenant, feature, cost in rows:
            self._add_spend(tenant, feature, cost)

    def configure(self, budgets: Mapping[tuple[str, str | None], Budget]) -> None:
        """New budgets from a config reload; spend and reservations carry over."""
        self._budgets = dict(budgets)
        self._budget_tenants = {k[0] for k in budgets}
        old = self._accounts
        self._accounts = {}
        for key, budget in budgets.items():
            acc = old.get(key) or _Account(budget)
            acc.budget = budget
            acc.notified = {t for t in acc.notified if t in budget.alert_at}
            self._accounts[key] = acc
        for key, acc in old.items():  # keep in-flight reservations of removed budgets settleable
            if key not in self._accounts and acc.reserved:
                self._accounts[key] = _Account(Budget(0, False, ()), acc.spent, acc.reserved)
        self.hold_jobs(self._jobs)  # the running jobs, on the new budgets

    # -- the request path -------------------------------------------------------------------

    def admit(self, tenant: str, feature: str | None, period: str, amount: int) -> None:
        """Reserve `amount` pico-USD or raise BudgetExceeded (hard limits only).

        Synchronous on purpose: no other request can run between the check and the reservation.
        """
        if period != self.period:
            self.roll(period)
        keys = self._keys(tenant, feature)
        for key in keys:
            acc = self._accounts[key]
            b = acc.budget
            if b.hard_limit and acc.spent + acc.reserved + acc.jobs + amount > b.monthly_pusd:
                raise budget_exceeded(key, self.period, b.monthly_pusd, acc.remaining, amount)
        for key in keys:
            self._accounts[key].reserved += amount

    def release(self, tenant: str, feature: str | None, amount: int) -> None:
        """Give back a reservation of a request that was never forwarded."""
        for key in self._keys(tenant, feature):
            acc = self._accounts[key]
            acc.reserved = max(acc.reserved - amount, 0)

    def settle(self, row: LedgerRow) -> list[Crossing]:
        """A row became terminal: drop its reservation, count its cost; return new crossings."""
        if row.status != "rejected" and row.reserved_pusd:  # rejected rows reserved nothing
            self.release(row.tenant, row.feature, row.reserved_pusd)
        if row.cost_pusd is None or row.period != self.period:
            return []
        self._add_spend(row.tenant, row.feature, row.cost_pusd)
        return self.due(row.tenant) if row.tenant in self._budget_tenants else []

    def roll(self, period: str) -> None:
        """A new period began: spend starts at zero, reservations in flight stay."""
        self.reset(period, ())

    def refresh(self, period: str, spent: Iterable[tuple[str, str | None, int]]) -> None:
        """Spend of every replica (a shared ledger's accounts) replaces ours (`due()` tells the
        crossings). `spent`: (tenant, feature, spent), feature None for a tenant's whole spend.
        Local reservations and the thresholds already notified are kept.
        """
        if period != self.period:
            self.roll(period)
        self.spent_all = {}
        for account in self._accounts.values():
            account.spent = 0
        for tenant, feature, amount in spent:
            if feature is None:
                self.spent_all[tenant] = amount
            acc = self._accounts.get((tenant, feature))
            if acc is not None:
                acc.spent = amount

    def hold(self, reserved: Mapping[tuple[str, str | None], int]) -> None:
        """Reservations held by other processes (a supervisor's workers) become this book's."""
        for key, acc in self._accounts.items():
            acc.reserved = reserved.get(key, 0)

    def hold_jobs(self, jobs: Iterable[tuple[str, str | None, int]]) -> None:
        """The bounds of the jobs still running (tenant, feature, pico-USD): video jobs are billed
        when they complete, so until then their bound counts like a reservation. Replaces the
        jobs held before (every process reads the same list of jobs from the ledger)."""
        self._jobs = list(jobs)
        for acc in self._accounts.values():
            acc.jobs = 0
        for tenant, feature, amount in self._jobs:
            for key in self._keys(tenant, feature):
                self._accounts[key].jobs += amount

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self) -> dict[tuple[str, str | None], tuple[Budget, int, int]]:
        """(tenant, feature) -> (budget, spent, reserved) for every configured budget."""
        return {
            k: (a.budget, a.spent, a.reserved + a.jobs)
            for k, a in self._accounts.items()
            if k in self._budgets
        }

    def reservations(self) -> dict[tuple[str, str | None], int]:
        """The reservations of this process's requests in flight (jobs held apart), per budget."""
        return {k: a.reserved for k, a in self._accounts.items() if k in self._budgets and a.reserved}

    def reserved_total(self) -> int:
        return sum(a.reserved + a.jobs for k, a in self._accounts.items() if k[1] is None)

    # -- helpers ------------------------------------------------------------------------------

    def _keys(self, tenant: str, feature: str | None) -> list[tuple[str, str | None]]:
        keys: list[tuple[str, str | None]] = []
        if (tenant, TENANT) in self._accounts:
            keys.append((tenant, TENANT))
        if feature is not None and (tenant, feature) in self._accounts:
            keys.append((tenant, feature))
        return keys

    def _add_spend(self, tenant: str, feature: str | None, cost: int) -> None:
        self.spent_all[tenant] = self.spent_all.get(tenant, 0) + cost
        for key in self._keys(tenant, feature):
            self._accounts[key].spent += cost

    def due(self, tenant: str | None = None) -> list[Crossing]:
        """Thresholds passed and not yet notified (marked notified as they are returned)."""
        out = []
        for key, acc in self._accounts.items():
            if tenant is not None and key[0] != tenant:
                continue
            b = acc.budget
            for t in b.alert_at:
                if t not in acc.notified and b.monthly_pusd and acc.spent >= t * b.monthly_pusd:
                    acc.notified.add(t)
                    out.append(Crossing(key[0], key[1], self.period, t, b.monthly_pusd, acc.spent))
        return out

    def mark_notified(self, tenant: str, feature: str | None, thresholds: Iterable[Decimal]) -> None:
        """Thresholds whose notification was delivered before this process started."""
        acc = self._accounts.get((tenant, feature))
        if acc is not None:
            acc.notified.update(thresholds)


def budget_exceeded(
    key: tuple[str, str | None], period: str, budget_pusd: int, remaining: int, amount: int
) -> BudgetExceeded:
    """The 429 a request gets when its reservation does not fit in the budget of `key`."""
    scope = key[0] if key[1] is None else f"{key[0]}/{key[1]}"
    return BudgetExceeded(
        f"Monthly budget exceeded for '{scope}' in period {period}: "
        f"budget ${format_usd(budget_pusd)}, remaining ${format_usd(max(remaining, 0), 6)}, "
        f"this request may cost up to ${format_usd(amount, 6)}."
    )


def projected_month_end(spent: int, period: str, periods: Periods, now: float) -> int:
    """Linear run rate over the elapsed part of the period, scaled to the whole period."""
    start, end = periods.bounds(period)
    elapsed = max(min(now, end) - start, 1.0)
    return int(Decimal(spent) * Decimal(end - start) / Decimal(elapsed))
