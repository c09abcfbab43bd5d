"""`report` and `estimate`: read the ledger, call report.py / estimate.py, print a table, CSV or JSON."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from proxy.cli.db import reading_ledger
from proxy.cli.tables import add_columns, console, print_table
from proxy.config import Config
from proxy.core.chargeback import (
    CHARGEBACK_KEEP,
    CHARGEBACK_NOTES,
    chargeback_csv,
)
from proxy.core.dedicated import (
    DedicatedCharge,
    MeasuredEndpoint,
    charge_view,
    check_month,
    dedicated_charges,
    estimate_rows,
    measured,
    measured_view,
)
from proxy.core.estimate import (
    ESTIMATE_KEEP,
    Estimate,
    EstimateParams,
    estimate_filter,
    estimate_view,
    money,
    per_request_money,
    plan_estimates,
    summary,
)
from proxy.core.pricing import format_usd
from proxy.core.report import (
    FORECAST_KEEP,
    Report,
    ReportError,
    build_report,
    check_report,
    forecast,
    report_csv,
    report_keep,
    report_view,
)
from proxy.core.rollups import Rollup, RollupFilter


def read_rollups(config: Config, path: str | None, keep: Sequence[str], where: RollupFilter) -> list[Rollup]:
    """The configured ledger's rollups (rollups.py) summed in the database over what `keep` leaves out.

    SQLite or PostgreSQL alike; a missing SQLite file is a usage error, not an empty report.
    """
    ledger = reading_ledger(config, path)

    async def read() -> list[Rollup]:
        try:
            return await ledger.rollups(keep, where)
        finally:
            await ledger.close()

    return asyncio.run(read())


def read_measured(config: Config, path: str | None, month: str) -> list[MeasuredEndpoint]:
    """The month's dedicated endpoint-minutes (table endpoint_minutes), merged per endpoint."""
    ledger = reading_ledger(config, path)

    async def read() -> list[MeasuredEndpoint]:
        try:
            return measured(await ledger.endpoint_minutes(month), config.dedicated.minute_us)
        finally:
            await ledger.close()

    return asyncio.run(read())


def read_charges(config: Config, path: str | None, month: str) -> tuple[list[Rollup], list[DedicatedCharge]]:
    """Every dedicated endpoint's chargeback of `month`: measured where minutes were, else configured."""
    check_month(month)
    summed = read_rollups(config, path, CHARGEBACK_KEEP, RollupFilter(periods=(month,)))
    found = read_measured(config, path, month)
    charges = dedicated_charges(summed, month, config.dedicated_endpoints, found, config.prices)
    return summed, charges


def _check_tenant(
    config: Config, tenant: str | None, month: str, rows: Sequence[Rollup], pruned: Sequence[Rollup]
) -> None:
    """A tenant neither configured nor in the month's ledger is a typo, not an empty report."""
    if tenant is None or tenant in config.tenants:
        return
    if any(r.tenant == tenant for r in rows) or any(a.tenant == tenant for a in pruned):
        return
    known = ", ".join(sorted(config.tenants))
    raise ReportError(f"no tenant {tenant!r} in {config.file} (known: {known}) nor in the ledger for {month}")


def run_report(config: Config, ledger: str | None, month: str, tenant: str | None, by: str, fmt: str) -> int:
    check_report(month, by)
    where = RollupFilter(periods=(month,), tenant=tenant)
    spent = read_rollups(config, ledger, FORECAST_KEEP, where)  # per tenant and model
    _check_tenant(config, tenant, month, spent, ())
    summed = read_rollups(config, ledger, report_keep(by), where)
    periods = config.budgets.periods
    report = build_report((), month, by, tenant, periods, summed, prices=config.prices)
    fc = forecast((), month, time.time(), periods, tenant, spent)
    check_month(month)
    dedicated = read_measured(config, ledger, month)
    if fmt == "json":
        view = report_view(report, fc)
        view["dedicated"] = [measured_view(m, config.dedicated.minute_us) for m in dedicated]
        print(json.dumps(view, indent=2))
    elif fmt == "csv":
        sys.stdout.write(report_csv(report))
    else:
        print_report(report, fc)
        print_measured(dedicated, month)
    return 0


def print_measured(found: list[MeasuredEndpoint], month: str) -> None:
    """Dedicated endpoints measured by the minute in the month (nothing when none was followed)."""
    if not found:
        return
    from rich.table import Table

    heads = ("endpoint", "model", "hardware", "minutes", "replica-min", "cost", "unknown min", "not observed")
    cells = [
        [
            m.endpoint_id,
            m.model,
            ", ".join(m.hardware) or "-",
            f"{m.minutes:,}",
            f"{m.replica_minutes:,}",
            _usd(format_usd(m.cost_pusd)),
            f"{m.unknown_minutes:,}",
            f"{m.unobserved_minutes:,}",
        ]
        for m in found
    ]
    t = Table(title=f"Dedicated endpoints measured by the minute, {month}")
    add_columns(t, heads, cells, labels=3)
    for line in cells:
        t.add_row(*line)
    out = console()
    print_table(out, t)
    out.print(
        "cost: replicas x the hardware's cents per minute over the observed minutes; minutes with an "
        "unknown replica count and minutes not observed are not in it (report --chargeback, estimate "
        "--measured-month compare it with Serverless and Batch)"
    )


def print_report(report: Report, fc: Any) -> None:
    from rich.table import Table

    view = report_view(report, fc)
    title = f"{report.period} by {report.by}" + (f", tenant {report.tenant}" if report.tenant else "")
    heads = (report.by, "requests", "in tok", "out tok", "cost USD", "avg in/out", "avg cost", "share")
    lines = [*view["groups"], view["total"]]
    with_units = any(line["units"] for line in lines)  # images, audio, video: their own units
    cells = [_report_cells(line) + ([_units_cell(line)] if with_units else []) for line in lines]
    t = Table(title=title)
    tail = (
        "estimated",
        "unknown",
        "rejected",
        "cached tok",
        "cache saved",
        *(("units",) if with_units else ()),
    )
    add_columns(t, (*heads, *tail), cells)
    for i, line in enumerate(cells):
        t.add_row(*line, end_section=i == len(cells) - 2)  # a rule above the total
    out = console()
    print_table(out, t)
    out.print("cost USD: rows with a known cost; 'unknown' (cost NULL) and 'rejected' rows are not in it")
    if fc is not None:
        f = Table(title=f"Month-end forecast ({fc.window})")
        cells = [
            [x["tenant"], x["model"], x["spent_usd"], x["projected_month_end_usd"]]
            for x in view["forecast"]["lines"]
        ]
        add_columns(f, ("tenant", "model", "spent USD", "projected USD"), cells, labels=2)
        for line in cells:
            f.add_row(*line)
        print_table(out, f)


def _units_cell(line: dict[str, Any]) -> str:
    return " ".join(f"{q} {u}" for u, q in line["units"].items()) or "-"


def _report_cells(line: dict[str, Any]) -> list[str]:
    """One group (or the total) of report_view as table cells."""
    share = line["share"]
    return [
        line["key"] or "-",
        f"{line['requests']:,}",
        f"{line['input_tokens']:,}",
        f"{line['output_tokens']:,}",
        line["cost_usd"],
        f"{line['avg_input_tokens'] or '-'}/{line['avg_output_tokens'] or '-'}",
        line["avg_cost_usd"] or "-",
        "-" if share is None else f"{float(share) * 100:.2f}%",
        str(line["estimated_usage"]),
        str(line["cost_unknown"]),
        str(line["rejected"]),
        f"{line['cached_tokens']:,}",
        line["cache_savings_usd"],
    ]


def run_chargeback(config: Config, ledger: str | None, month: str, tenant: str | None, fmt: str) -> int:
    """Each dedicated endpoint's month charged back to tenants (`report --chargeback`): its measured
    endpoint-minutes when it was followed, else its configured cost."""
    if not config.dedicated_endpoints and not config.followed_endpoints() and not config.dedicated.discover:
        raise ReportError(
            f"no dedicated_endpoints (nor dedicated.follow) in {config.file}: nothing to charge back"
        )
    summed, found = read_charges(config, ledger, month)
    _check_tenant(config, tenant, month, summed, ())
    views = [charge_view(dc, tenant, config.dedicated.minute_us) for dc in found]
    if fmt == "json":
        print(json.dumps({"period": month, "endpoints": views, "notes": CHARGEBACK_NOTES}, indent=2))
    elif fmt == "csv":
        sys.stdout.write(chargeback_csv(views))
    else:
        print_chargeback(views)
    return 0


def print_chargeback(views: list[dict[str, Any]]) -> None:
    from rich.table import Table

    out = console()
    heads = (
        "tenant",
        "requests",
        "tokens",
        "share",
        "charge",
        "eff. $/1M tok",
        "serverless",
        "serverless $/1M",
    )
    for v in views:
        cost = f"{_usd(v['monthly_usd'])} ({v['basis']})"
        total = {"tenant": "total", "share": "1" if v["tokens"] else None, "charge_usd": v["monthly_usd"]}
        lines = [*v["tenants"]]
        if v["unallocated_usd"] != "0":
            lines.append({"tenant": "unallocated (no tokens)", "charge_usd": v["unallocated_usd"]})
        cells = [_chargeback_cells(line) for line in [*lines, {**v, **total}]]
        t = Table(title=f"{v['endpoint']} ({v['model']}), {v['period']}: {cost}")
        add_columns(t, heads, cells)
        for i, line in enumerate(cells):
            t.add_row(*line, end_section=i == len(lines) - 1)
        print_table(out, t)
        if v.get("source") == "measured":
            out.print(_same_tokens_line(v["compare"]), soft_wrap=True)
    out.print("share: tokens (in + out) / all the model's tokens in the month; charges sum to the cost")


def _same_tokens_line(c: dict[str, Any]) -> str:
    """'the same 1,234 tokens: dedicated $x ($y/1M), Serverless $z, Batch $w -> cheapest: ...'."""
    return (
        f"  the same {c['tokens']:,} tokens: dedicated {_usd(c['dedicated_usd'])} "
        f"({_usd(c['dedicated_usd_per_mtok'], 4)}/1M), Serverless {_usd(c['serverless_usd'])} "
        f"({_usd(c['serverless_usd_per_mtok'], 4)}/1M), Batch {_usd(c['batch_usd'])} "
        f"({_usd(c['batch_usd_per_mtok'], 4)}/1M) at {c['rates_of']}'s rates "
        f"-> cheapest: {c['cheapest'] or '-'}"
    )


def _chargeback_cells(line: dict[str, Any]) -> list[str]:
    """One tenant (or the unallocated rest, or the total) of a chargeback view as table cells."""
    share = line.get("share")
    return [
        line["tenant"],
        "-" if line.get("requests") is None else f"{line['requests']:,}",
        "-" if line.get("tokens") is None else f"{line['tokens']:,}",
        "-" if share is None else f"{Decimal(share) * 100:.2f}%",
        _usd(line["charge_usd"]),
        _usd(line.get("effective_usd_per_mtok"), 4),
        _usd(line.get("serverless_usd")),
        _usd(line.get("serverless_usd_per_mtok"), 4),
    ]


def _usd(value: str | None, places: int = 2) -> str:
    """'$1,234.57' from an exact decimal string; '-' for None."""
    return "-" if value is None else f"${Decimal(value):,.{places}f}"


def run_estimate(config: Config, ledger: str | None, params: EstimateParams, fmt: str) -> int:
    summed: list[Rollup] = []
    now_us = time.time_ns() // 1000
    periods = config.budgets.periods
    if params.from_ledger:
        summed = read_rollups(config, ledger, ESTIMATE_KEEP, estimate_filter(params, now_us, periods))
    found = plan_estimates(config.prices, params, (), now_us, periods, summed) if params.wants_traffic else []
    rows: list[dict[str, Any]] = []
    if params.measured_month:
        _, charges = read_charges(config, ledger, params.measured_month)
        rows = estimate_rows(charges, config.dedicated.minute_us)
    if fmt == "json":
        data: dict[str, Any] = {"estimates": [estimate_view(e) for e in found]}
        if params.measured_month:
            data["dedicated_measured"] = rows
        print(json.dumps(data, indent=2))
    else:
        if found:
            print_estimates(found)
        if params.measured_month:
            print_measured_estimate(rows, params.measured_month)
    return 0


def print_measured_estimate(rows: list[dict[str, Any]], month: str) -> None:
    """Each dedicated endpoint's cost in `month` against the same tokens on Serverless and Batch."""
    from rich.table import Table

    out = console()
    if not rows:
        out.print(f"no dedicated endpoint (configured or measured) for {month}")
        return
    heads = (
        "endpoint",
        "source",
        "tokens",
        "dedicated",
        "ded. $/1M",
        "serverless",
        "batch",
        "cheapest",
        "break-even tok",
    )
    cells = []
    for r in rows:
        c = r["compare"]
        cells.append(
            [
                r["endpoint"],
                r["source"],
                f"{c['tokens']:,}",
                _usd(c["dedicated_usd"]),
                _usd(c["dedicated_usd_per_mtok"], 4),
                _usd(c["serverless_usd"]),
                _usd(c["batch_usd"]),
                c["cheapest"] or "-",
                "-" if c["break_even_tokens"] is None else f"{c['break_even_tokens']:,}",
            ]
        )
    t = Table(title=f"Dedicated vs Serverless vs Batch for the tokens served, {month}")
    add_columns(t, heads, cells, labels=2)
    for line in cells:
        t.add_row(*line)
    print_table(out, t)
    for r in rows:
        out.print(f"{r['endpoint']}: {r['basis']}", soft_wrap=True)


def print_estimates(found: list[Estimate]) -> None:
    from rich.table import Table

    out = console()
    for e in found:
        out.print(summary(e), soft_wrap=True)
        if e.traffic.source != "given" and (e is found[0] or e.traffic is not found[0].traffic):
            out.print(f"  traffic: {e.traffic.source}", soft_wrap=True)
    heads = ["model", "serverless/req", "serverless/month", "batch/req", "batch/month"]
    if found[0].dedicated:
        heads += ["dedicated/month", "dedicated $/1M tok", "break-even tok/month", "cheaper"]
    cells = [_estimate_cells(e) for e in found]
    t = Table(title="Serverless vs Batch" + (" vs Dedicated" if found[0].dedicated else ""))
    add_columns(t, heads, cells)
    for line in cells:
        t.add_row(*line)
    print_table(out, t)


def _estimate_cells(e: Estimate) -> list[str]:
    """One estimate as table cells: per request to PER_REQUEST_PLACES decimals, months to the cent."""
    cells = [
        e.model,
        per_request_money(e.per_request),
        money(e.monthly),
        per_request_money(e.per_request_batch),
        money(e.monthly_batch),
    ]
    if e.dedicated:
        d = e.dedicated
        cells += [
            money(d.monthly_pusd),
            f"${d.usd_per_mtok:,.4f}" if d.usd_per_mtok.is_finite() else "-",
            "-" if d.break_even_tokens is None else f"{d.break_even_tokens:,}",
            d.cheaper,
        ]
    return cells


def params_from_args(args: Any) -> EstimateParams:
    from proxy.core.estimate import parse_decimal

    def dec(name: str) -> Any:
        v = getattr(args, name)
        return None if v is None else parse_decimal(v, "--" + name.replace("_", "-"))

    return EstimateParams(
        model=args.model,
        requests_per_month=args.requests_per_month,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        from_ledger=args.from_ledger,
        window=args.window,
        feature=args.feature,
        tenant=args.tenant,
        dedicated_monthly_usd=dec("dedicated_monthly_usd"),
        gpu_hourly_usd=dec("gpu_hourly_usd"),
        gpus=args.gpus,
        hours_per_month=dec("hours_per_month"),
        compare=tuple(m for m in (args.compare or "").split(",") if m),
        measured_month=args.measured_month,
    )
