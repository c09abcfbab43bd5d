"""Retention (`db prune`) and exports (`db export`): reports are unchanged by a prune, exports are exact."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.budgets import Periods
from proxy.core.report import GROUPINGS, build_report, report_keep, report_view
from proxy.core.retention import export_record
from proxy.core.rollups import RollupFilter, merge, rollup_rows
from proxy.ledger import TERMINAL_STATUSES, LedgerRow, period_of
from proxy.ledger.sqlite import SQLiteLedger
from tests.test_cli import ROOT, run_cli

CONFIG = str(ROOT / "config" / "example.yaml")
UTC = Periods()
BERLIN = Periods("Europe/Berlin")
# 2026-01-01 .. 2026-04-30 UTC: four months of rows, two of them to be pruned
START = calendar.timegm((2026, 1, 1, 0, 0, 0)) * 1_000_000
SPAN = (calendar.timegm((2026, 5, 1, 0, 0, 0)) * 1_000_000) - START


def _row_strategy(i: int) -> st.SearchStrategy[LedgerRow]:
    def build(
        offset: int,
        tenant: str,
        model: str,
        feature: str | None,
        env: str | None,
        status: str,
        source: str,
        tokens: tuple[int, int] | None,
        cost: int | None,
    ) -> LedgerRow:
        started = START + offset
        return LedgerRow(
            f"req_{i}",
            tenant,
            "k1",
            model,
            "chat",
            "serverless",
            feature,
            env,
            False,
            started,
            period_of(started),
            status,
            started + 1000,
            200,
            None if tokens is None else tokens[0],
            None if tokens is None else tokens[1],
            usage_source=source,
            cost_pusd=None if status == "rejected" else cost,
        )

    return st.builds(
        build,
        st.integers(0, SPAN - 1),
        st.sampled_from(["acme", "globex"]),
        st.sampled_from(["m/a", "m/b"]),
        st.sampled_from([None, "chat", "search"]),
        st.sampled_from([None, "prod"]),
        st.sampled_from(TERMINAL_STATUSES),
        st.sampled_from(["upstream", "estimated", "none"]),
        st.one_of(st.none(), st.tuples(st.integers(0, 10**7), st.integers(0, 10**7))),
        st.one_of(st.none(), st.integers(0, 10**15)),
    )


ledgers = st.integers(1, 40).flatmap(lambda n: st.tuples(*(_row_strategy(i) for i in range(n))))


async def _write(path: Path, rows: tuple[LedgerRow, ...], zone: Periods = UTC) -> SQLiteLedger:
    ledger = SQLiteLedger(path, timezone=zone.timezone)
    await ledger.open()
    for r in rows:
        assert await ledger.record(r)
    await ledger.close()
    return ledger


async def _views(ledger: SQLiteLedger, period: str, periods: Periods) -> dict[str, object]:
    """Every grouping and tenant filter of the period's report, from the ledger's rollups."""
    views = {}
    for by in GROUPINGS:
        for tenant in (None, "acme"):
            summed = await ledger.rollups(report_keep(by), RollupFilter(periods=(period,), tenant=tenant))
            views[f"{by}/{tenant}"] = report_view(build_report((), period, by, tenant, periods, summed))
    return views


def _row_views(rows: tuple[LedgerRow, ...], period: str, periods: Periods) -> dict[str, object]:
    return {
        f"{by}/{tenant}": report_view(build_report(rows, period, by, tenant, periods))
        for by in GROUPINGS
        for tenant in (None, "acme")
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ledgers, zone=st.sampled_from([UTC, BERLIN]))
def test_reports_are_identical_before_and_after_a_prune(
    tmp_path_factory: object, rows: tuple[LedgerRow, ...], zone: Periods
) -> None:
    """Every grouping and tenant filter of every month reports the rows' figures, before and after `prune`."""
    path = tmp_path_factory.mktemp("prune") / "l.db"  # type: ignore[attr-defined]

    async def run() -> None:
        ledger = await _write(path, rows, zone)
        months = ["2026-01", "2026-02", "2026-03", "2026-04"]
        for m in months:
            assert await _views(ledger, m, zone) == _row_views(rows, m, zone), m
        result = await ledger.prune("2026-03")
        assert result.rows == sum(1 for r in rows if r.period < "2026-03")
        for m in months:
            kept = await ledger.rows(period=m)
            assert (kept == []) == (m < "2026-03") or not any(r.period == m for r in rows)
            assert await _views(ledger, m, zone) == _row_views(rows, m, zone), m
        again = await ledger.prune("2026-03")
        assert again.rows == 0

    asyncio.run(run())


def test_rollups_add_up_to_the_rows_and_merge_is_associative() -> None:
    """Summing in two halves and merging gives the rollups of summing everything at once."""
    rows = [
        LedgerRow(f"r{i}", "acme", "k", "m/a", "chat", "serverless", None, None, False,
                  START + i * 3_600_000_000, "2026-01", "ok", None, 200, 10 * i, i,
                  usage_source="upstream", cost_pusd=7 * i)
        for i in range(50)
    ]  # fmt: skip
    whole = rollup_rows(rows, UTC)
    halves = merge([*rollup_rows(rows[:17], UTC), *rollup_rows(rows[17:], UTC)])
    assert whole == halves
    assert sum(a.cost_pusd for a in whole) == sum(7 * i for i in range(50))
    assert sum(a.requests for a in whole) == 50
    assert len(whole) == 3  # 50 hourly rows from midnight span three UTC days


async def test_in_flight_rows_and_the_kept_periods_are_never_pruned(tmp_path: Path) -> None:
    """Only terminal rows of periods before --before go; in-flight rows stay for the reaper."""
    ledger = SQLiteLedger(tmp_path / "l.db")
    await ledger.open()
    jan, mar = START, START + 70 * 86_400_000_000
    for i, started in enumerate((jan, jan + 1, mar)):
        await ledger.record(
            LedgerRow(f"t{i}", "acme", "k", "m/a", "chat", "serverless", None, None, False, started,
                      period_of(started), "ok", started + 5, 200, 3, 4, usage_source="upstream", cost_pusd=9)
        )  # fmt: skip
    await ledger.begin(
        LedgerRow("f1", "acme", "k", "m/a", "chat", "serverless", None, None, True, jan + 2, "2026-01")
    )
    result = await ledger.prune("2026-03")
    await ledger.close()
    reader = SQLiteLedger(tmp_path / "l.db")
    left = {r.request_id: r.status for r in await reader.rows()}
    assert (result.rows, result.periods) == (2, ("2026-01",))
    assert left == {"f1": "in_flight", "t2": "ok"}


async def test_cli_prune_refuses_the_current_period_and_reports_survive(tmp_path: Path) -> None:
    """`db prune` exits 2 for the current month; after a prune `report --format json` is unchanged."""
    rows = tuple(
        LedgerRow(f"c{i}", "acme" if i % 3 else "globex", "k", "arcee-ai/maestro-reasoning", "chat",
                  "serverless", "chat" if i % 2 else None, "prod", False, START + i * 86_400_000_000,
                  period_of(START + i * 86_400_000_000), "ok", None, 200, 3000, 1000,
                  usage_source="upstream", cost_pusd=6_000_000_000 + i)
        for i in range(60)
    )  # fmt: skip
    path = tmp_path / "l.db"
    await _write(path, rows)
    base = ("--config", CONFIG, "--ledger", str(path))
    reports = {}
    for month in ("2026-01", "2026-02"):
        code, out, err = await run_cli("report", *base, "--month", month, "--by", "day", "--format", "json")
        assert code == 0, err
        reports[month] = json.loads(out)
    now = dt.datetime.now(dt.UTC)
    nxt = f"{now.year + (now.month == 12):04d}-{now.month % 12 + 1:02d}"
    code, _, err = await run_cli("db", "prune", *base, "--before", nxt)
    assert code == 2 and "current period" in err
    code, out, err = await run_cli("db", "prune", *base, "--before", "2026-02")
    assert code == 0, err
    assert "pruned 31 row(s)" in out
    for month in ("2026-01", "2026-02"):
        code, out, err = await run_cli("report", *base, "--month", month, "--by", "day", "--format", "json")
        assert code == 0, err
        assert json.loads(out) == reports[month]


async def test_cli_export_is_flat_exact_jsonl(tmp_path: Path) -> None:
    """Every row once, same keys in the same order on every line, money exact as int and decimal string."""
    rows = tuple(
        LedgerRow(f"e{i:03d}", "acme", "k", "m/a", "chat", "serverless", None, None, bool(i % 2),
                  START + i, "2026-01", "ok" if i % 5 else "rejected", START + i + 7, 200,
                  None if i % 5 == 0 else i, None if i % 5 == 0 else 2 * i, usage_source="upstream",
                  cost_pusd=None if i % 5 == 0 else 123_456_789_012_345 + i)
        for i in range(12_345 // 100)
    )  # fmt: skip
    path = tmp_path / "l.db"
    ledger = await _write(path, rows)
    out_file = tmp_path / "out.jsonl"
    code, _, err = await run_cli(
        "db", "export", "--config", CONFIG, "--ledger", str(path), "--month", "2026-01", "-o", str(out_file)
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == [r.request_id for r in rows]
    assert {tuple(x) for x in lines} == {tuple(export_record(rows[0]))}
    for x, r in zip(lines, rows, strict=True):
        assert x["cost_pusd"] == r.cost_pusd
        if r.cost_pusd is not None:
            assert Decimal(x["cost_usd"]) == Decimal(r.cost_pusd).scaleb(-12)
        assert x["started_at"].startswith("2026-01-01T00:00:00.")
    paged = [r async for r in ledger.iter_rows(period="2026-01", page=7)]
    assert paged == list(rows)
