"""Shared dedicated endpoints: a month's endpoint cost charged back to tenants by token share.

Pure arithmetic over the ledger's rollups, exact like report.py: charges are whole pico-USD that add up
to the endpoint's monthly cost (largest remainder), ratios are `Fraction`s until shown.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.pricing import PUSD_PER_USD, format_usd
from proxy.core.records import LedgerRow
from proxy.core.report import ReportError, round_half_up
from proxy.core.rollups import Rollup, rollup_rows

TOKENS_PER_MTOK = 1_000_000

CHARGED_STATUSES = frozenset({"ok", "client_aborted"})  # the upstream served (part of) these
_MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


@dataclass(frozen=True, slots=True)
class DedicatedEndpoint:
    """A dedicated endpoint shared by tenants; its cost is charged back by token share."""

    name: str
    model: str
    monthly_pusd: int
    basis: str  # how the monthly cost was given, e.g. "monthly_usd 2000" or "hourly_usd 3.2 x 730 h"
    endpoint_id: str | None = None  # the together endpoint whose measured minutes replace the figure
    configured: bool = True  # False: no monthly figure was given (endpoint_id only)


@dataclass(frozen=True, slots=True)
class ChargeLine:
    """One tenant's part of a dedicated endpoint's month."""

    tenant: str
    requests: int  # charged rows (ok / client_aborted) with token counts
    input_tokens: int
    output_tokens: int
    share: Fraction  # tokens / all tokens of the endpoint's model
    charge_pusd: int
    serverless_pusd: int  # the charged rows' recorded (Serverless-rate) cost
    cost_unknown: int = 0  # charged rows whose recorded cost is NULL: not in serverless_pusd

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Chargeback:
    """A dedicated endpoint's monthly cost spread over tenants by token share."""

    endpoint: str
    model: str
    period: str
    monthly_pusd: int
    basis: str
    lines: tuple[ChargeLine, ...]
    unallocated_pusd: int  # the whole cost when no tenant used the model this month, else 0

    @property
    def tokens(self) -> int:
        return sum(line.tokens for line in self.lines)


def split_by_share(total: int, weights: Sequence[int]) -> list[int]:
    """Integer parts of `total` proportional to `weights` that add up to `total` exactly.

    Largest remainder: each part is floored, then the pico-USD left over go one each to the parts
    with the largest fractional remainders (ties to the earlier part). All weights 0 -> all parts 0.
    """
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    parts = [total * w // whole for w in weights]
    rest = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[:rest]:
        parts[i] += 1
    return parts


CHARGEBACK_KEEP = ("period", "tenant", "model", "mode", "status")  # the rollup dimensions read


def chargeback(
    rollups: Iterable[Rollup], period: str, endpoint: str, model: str, monthly_pusd: int, basis: str = ""
) -> Chargeback:
    """Charge each tenant monthly cost x its share of the model's tokens in `period`.

    Tokens are input + output of ok and client_aborted rows (not batch rows, which never reach the
    endpoint). A tenant with only other rows (rejected, errors) is listed and charged 0.
    """
    if not _MONTH_RE.match(period):
        raise ReportError(f"month must look like 2026-11, got {period!r}")
    acc: dict[str, list[int]] = {}  # tenant -> requests, in, out, serverless, unknown
    for r in rollups:
        if r.model != model or r.period != period or r.mode == "batch":
            continue
        a = acc.setdefault(r.tenant, [0, 0, 0, 0, 0])
        if r.status not in CHARGED_STATUSES:
            continue
        for i, v in enumerate((r.with_usage, r.input_tokens, r.output_tokens, r.cost_pusd, r.cost_unknown)):
            a[i] += v
    tenants = sorted(acc)
    tokens = [acc[t][1] + acc[t][2] for t in tenants]
    whole = sum(tokens)
    charges = split_by_share(monthly_pusd, tokens)
    lines = tuple(
        ChargeLine(
            t,
            acc[t][0],
            acc[t][1],
            acc[t][2],
            Fraction(n, whole) if whole else Fraction(0),
            c,
            acc[t][3],
            acc[t][4],
        )
        for t, n, c in zip(tenants, tokens, charges, strict=True)
    )
    lines = tuple(sorted(lines, key=lambda line: (-line.charge_pusd, -line.tokens, line.tenant)))
    return Chargeback(endpoint, model, period, monthly_pusd, basis, lines, 0 if whole else monthly_pusd)


def per_mtok(pusd: int, tokens: int) -> Decimal | None:
    """USD per 1M tokens (6 decimals, half-up); None without tokens."""
    if tokens == 0:
        return None
    return round_half_up(Fraction(pusd * TOKENS_PER_MTOK, tokens * PUSD_PER_USD), 6)


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


def chargeback_view(cb: Chargeback, tenant: str | None = None) -> dict[str, Any]:
    """A chargeback as JSON-able values; `tenant` keeps only that tenant's line (shares unchanged)."""
    serverless = sum(line.serverless_pusd for line in cb.lines)
    return {
        "endpoint": cb.endpoint,
        "model": cb.model,
        "period": cb.period,
        "monthly_usd": format_usd(cb.monthly_pusd),
        "basis": cb.basis,
        "requests": sum(line.requests for line in cb.lines),
        "tokens": cb.tokens,
        "allocated_usd": format_usd(cb.monthly_pusd - cb.unallocated_pusd),
        "unallocated_usd": format_usd(cb.unallocated_pusd),
        "effective_usd_per_mtok": _dec(per_mtok(cb.monthly_pusd, cb.tokens)),
        "serverless_usd": format_usd(serverless),
        "serverless_usd_per_mtok": _dec(per_mtok(serverless, cb.tokens)),
        "tenants": [
            {
                "tenant": line.tenant,
                "requests": line.requests,
                "input_tokens": line.input_tokens,
                "output_tokens": line.output_tokens,
                "tokens": line.tokens,
                "share": format(round_half_up(line.share, 6).normalize(), "f"),
                "charge_usd": format_usd(line.charge_pusd),
                "effective_usd_per_mtok": _dec(per_mtok(line.charge_pusd, line.tokens)),
                "serverless_usd": format_usd(line.serverless_pusd),
                "serverless_usd_per_mtok": _dec(per_mtok(line.serverless_pusd, line.tokens)),
                "cost_unknown": line.cost_unknown,
            }
            for line in cb.lines
            if tenant is None or line.tenant == tenant
        ],
    }


CHARGEBACK_NOTES = {
    "share": "tenant's input+output tokens / all tokens of the model this month (ok and client_aborted rows)",
    "charge_usd": "monthly cost x share, in whole pico-USD; largest remainder makes the charges sum exactly",
    "serverless_usd": "what the same requests cost at Serverless rates (the ledger's recorded cost)",
}


CHARGEBACK_CSV_COLUMNS = (
    "endpoint",
    "model",
    "tenant",
    "requests",
    "tokens",
    "share",
    "charge_usd",
    "effective_usd_per_mtok",
    "serverless_usd",
    "serverless_usd_per_mtok",
)


def chargeback_csv(views: Sequence[dict[str, Any]]) -> str:
    """One line per endpoint and tenant, then the endpoint's total (and unallocated cost, if any)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CHARGEBACK_CSV_COLUMNS)
    for v in views:
        for line in v["tenants"]:
            w.writerow([v["endpoint"], v["model"], *(_cell(line[c]) for c in CHARGEBACK_CSV_COLUMNS[2:])])
        if v["unallocated_usd"] != "0":
            gap = {"tenant": "unallocated", "requests": "", "tokens": 0, "charge_usd": v["unallocated_usd"]}
            w.writerow([v["endpoint"], v["model"], *(_cell(gap.get(c)) for c in CHARGEBACK_CSV_COLUMNS[2:])])
        total = {**v, "tenant": "total", "share": "1" if v["tokens"] else "", "charge_usd": v["monthly_usd"]}
        w.writerow([v["endpoint"], v["model"], *(_cell(total[c]) for c in CHARGEBACK_CSV_COLUMNS[2:])])
    return buf.getvalue()


def _cell(value: Any) -> Any:
    return "" if value is None else value


def chargebacks(
    rows: Iterable[LedgerRow],
    period: str,
    endpoints: Iterable[DedicatedEndpoint],
    rollups: Iterable[Rollup] = (),
) -> list[Chargeback]:
    """The chargeback of every configured dedicated endpoint for `period`, from rows or rollups."""
    summed = [*rollup_rows(rows, Periods()), *rollups]
    return [chargeback(summed, period, e.name, e.model, e.monthly_pusd, e.basis) for e in endpoints]
