"""`report` and `estimate`: read the ledger, call report.py / estimate.py, print a table, CSV or JSON."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from decimal import Decimal
from typing import Any

from proxy.cli.db import reading_ledger
from proxy.config import Config
from proxy.core.chargeback import CHARGEBACK_NOTES, chargeback_csv, chargeback_view, chargebacks
from proxy.core.estimate import (
    Estimate,
    EstimateParams,
    estimate_view,
    money,
    parse_window,
    per_request_money,
    plan_estimates,
    summary,
)
from proxy.core.report import Report, ReportError, build_report, forecast, report_csv, report_view
from proxy.core.retention import Aggregate
from proxy.ledger import LedgerRow


def read_ledger(
    config: Config,
    path: str | None,
    *,
    period: str | None = None,
    since_us: int | None = None,
    pruned: bool = False,
) -> tuple[list[LedgerRow], list[Aggregate]]:
    """The configured ledger's rows (and a pruned period's aggregates), read-only.

    SQLite or PostgreSQL alike; a missing SQLite file is a usage error, not an empty report.
    """
    ledger = reading_ledger(config, path)

    async def read() -> tuple[list[LedgerRow], list[Aggregate]]:
        try:
            rows = await ledger.rows(period=period, since_us=since_us)
            aggs = await ledger.aggregates(period) if pruned and period is not None else []
            return rows, aggs
        finally:
            await ledger.close()

    return asyncio.run(read())


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def run_report(config: Config, ledger: str | None, month: str, tenant: str | None, by: str, fmt: str) -> int:
    rows, pruned = read_ledger(config, ledger, period=month, pruned=True)  # + rows `db prune` folded
    periods = config.budgets.periods
    report = build_report(rows, month, by, tenant, periods, pruned)
    fc = forecast(rows, month, time.time(), periods, tenant)
    if fmt == "json":
        print(json.dumps(report_view(report, fc), indent=2))
    elif fmt == "csv":
        sys.stdout.write(report_csv(report))
    else:
        print_report(report, fc)
    return 0


def print_report(report: Report, fc: Any) -> None:
    from rich.table import Table

    view = report_view(report, fc)
    title = f"{report.period} by {report.by}" + (f", tenant {report.tenant}" if report.tenant else "")
    t = Table(title=title)
    heads = ("requests", "in tok", "out tok", "cost USD", "avg in/out", "avg cost", "share")
    t.add_column(report.by, no_wrap=True)
    for h in (*heads, "estimated", "unknown", "rejected"):
        t.add_column(h, justify="right", no_wrap=True)
    for line in [*view["groups"], view["total"]]:
        share = line["share"]
        t.add_row(
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
            end_section=line is view["groups"][-1] if view["groups"] else False,
        )
    console = _console()
    console.print(t)
    console.print("cost USD: rows with a known cost; 'unknown' (cost NULL) and 'rejected' rows are not in it")
    if fc is not None:
        f = Table(title=f"Month-end forecast ({fc.window})")
        for col in ("tenant", "model", "spent USD", "projected USD"):
            f.add_column(col, justify="left" if col in ("tenant", "model") else "right")
        for line in view["forecast"]["lines"]:
            f.add_row(line["tenant"], line["model"], line["spent_usd"], line["projected_month_end_usd"])
        console.print(f)


def run_chargeback(config: Config, ledger: str | None, month: str, tenant: str | None, fmt: str) -> int:
    """Each dedicated endpoint's month charged back to tenants (`report --chargeback`)."""
    if not config.dedicated_endpoints:
        raise ReportError(f"no dedicated_endpoints in {config.file}: nothing to charge back")
    rows, _ = read_ledger(config, ledger, period=month)
    views = [chargeback_view(cb, tenant) for cb in chargebacks(rows, month, config.dedicated_endpoints)]
    if fmt == "json":
        print(json.dumps({"period": month, "endpoints": views, "notes": CHARGEBACK_NOTES}, indent=2))
    elif fmt == "csv":
        sys.stdout.write(chargeback_csv(views))
    else:
        print_chargeback(views)
    return 0


def print_chargeback(views: list[dict[str, Any]]) -> None:
    from rich.table import Table

    console = _console()
    for v in views:
        cost = f"{_usd(v['monthly_usd'])} ({v['basis']})"
        t = Table(title=f"{v['endpoint']} ({v['model']}), {v['period']}: {cost}")
        t.add_column("tenant", no_wrap=True)
        for h in ("requests", "tokens", "share", "charge", "eff. $/1M tok", "serverless", "serverless $/1M"):
            t.add_column(h, justify="right", no_wrap=True)
        total = {"tenant": "total", "share": "1" if v["tokens"] else None, "charge_usd": v["monthly_usd"]}
        lines = [*v["tenants"]]
        if v["unallocated_usd"] != "0":
            lines.append({"tenant": "unallocated (no tokens)", "charge_usd": v["unallocated_usd"]})
        for line in [*lines, {**v, **total}]:
            share = line.get("share")
            t.add_row(
                line["tenant"],
                "-" if line.get("requests") is None else f"{line['requests']:,}",
                "-" if line.get("tokens") is None else f"{line['tokens']:,}",
                "-" if share is None else f"{Decimal(share) * 100:.2f}%",
                _usd(line["charge_usd"]),
                _usd(line.get("effective_usd_per_mtok"), 4),
                _usd(line.get("serverless_usd")),
                _usd(line.get("serverless_usd_per_mtok"), 4),
                end_section=line is lines[-1],
            )
        console.print(t)
    console.print("share: tokens (in + out) / all the model's tokens in the month; charges sum to the cost")


def _usd(value: str | None, places: int = 2) -> str:
    """'$1,234.57' from an exact decimal string; '-' for None."""
    return "-" if value is None else f"${Decimal(value):,.{places}f}"


def run_estimate(config: Config, ledger: str | None, params: EstimateParams, fmt: str) -> int:
    rows: list[LedgerRow] = []
    now_us = time.time_ns() // 1000
    if params.from_ledger:
        since = now_us - parse_window(params.window) * 1_000_000
        rows, _ = read_ledger(config, ledger, since_us=since)
    found = plan_estimates(config.prices, params, rows, now_us)
    if fmt == "json":
        print(json.dumps({"estimates": [estimate_view(e) for e in found]}, indent=2))
    else:
        print_estimates(found)
    return 0


def print_estimates(found: list[Estimate]) -> None:
    from rich.table import Table

    console = _console()
    for e in found:
        console.print(summary(e), soft_wrap=True)
        if e.traffic.source != "given" and (e is found[0] or e.traffic is not found[0].traffic):
            console.print(f"  traffic: {e.traffic.source}", soft_wrap=True)
    t = Table(title="Serverless vs Batch" + (" vs Dedicated" if found[0].dedicated else ""))
    cols = ["serverless/req", "serverless/month", "batch/req", "batch/month"]
    if found[0].dedicated:
        cols += ["dedicated/month", "dedicated $/1M tok", "break-even tok/month", "cheaper"]
    t.add_column("model", no_wrap=True)
    for c in cols:
        t.add_column(c, justify="right")
    for e in found:
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
        t.add_row(*cells)
    console.print(t)


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
    )
