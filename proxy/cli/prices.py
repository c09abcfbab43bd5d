"""`prices list` and `prices sync`: the price table against the upstream's GET /v1/models."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.config import Config
from proxy.config.prices import dump_price_table
from proxy.core.pricing import (
    PriceTable,
    Rates,
    discounted,
    parse_price_table,
    pusd_rate_to_decimal,
    rate_to_pusd,
)
from proxy.errors import ConfigError

PRICED_TYPES = {"chat", "language", "code", "embedding", "moderation", "rerank"}


def list_prices(config: Config, fmt: str) -> int:
    table = config.prices
    rows: list[dict[str, Any]] = []
    for model in sorted(table.models):
        r = table.models[model]
        rows.append(
            {
                "model": model,
                "input": str(pusd_rate_to_decimal(r.input)),
                "output": str(pusd_rate_to_decimal(r.output)),
                "batch_input": str(pusd_rate_to_decimal(r.batch_input)),
                "batch_output": str(pusd_rate_to_decimal(r.batch_output)),
                "context_length": r.context_length,
                "read": r.read,
            }
        )
    if fmt == "json":
        print(json.dumps({"source": table.source, "unit": "USD per 1M tokens", "models": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{table.source} (USD per 1M tokens)")
    for col in ("model", "input", "output", "batch in", "batch out", "context", "read"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        t.add_row(
            str(row["model"]),
            str(row["input"]),
            str(row["output"]),
            str(row["batch_input"]),
            str(row["batch_output"]),
            str(row["context_length"] or ""),
            str(row["read"] or ""),
        )
    Console(width=None if sys.stdout.isatty() else 140).print(t)
    return 0


async def fetch_upstream_prices(base_url: str, api_key: str) -> dict[str, dict[str, Any]]:
    """model id -> {input, output (Decimal USD per 1M), context_length, type} from GET /models."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
        session.get(
            base_url.rstrip("/") + "/models",
            headers={"Authorization": f"Bearer {api_key}"},
            allow_redirects=False,
        ) as resp,
    ):
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"GET /models answered {resp.status}: {text[:200]}")
    data = json.loads(text, parse_float=Decimal)
    items = data.get("data") if isinstance(data, dict) else data  # together.ai: a bare array
    if not isinstance(items, list):
        raise RuntimeError("GET /models did not return a list of models")
    found: dict[str, dict[str, Any]] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        pricing = item.get("pricing")
        if not isinstance(pricing, dict):
            continue
        found[item["id"]] = {
            "input": Decimal(str(pricing.get("input", 0))),
            "output": Decimal(str(pricing.get("output", 0))),
            "context_length": item.get("context_length"),
            "type": item.get("type"),
        }
    return found


def diff_prices(
    table: PriceTable, upstream: dict[str, dict[str, Any]], include_all: bool
) -> tuple[list[str], dict[str, Rates]]:
    """Human-readable differences and the updated model -> Rates mapping."""
    today = dt.date.today().isoformat()
    lines: list[str] = []
    models = dict(table.models)
    for model in sorted(set(models) | (set(upstream) if include_all else set())):
        up = upstream.get(model)
        cur = models.get(model)
        if up is None:
            lines.append(f"- {model}: not offered by the upstream any more (kept)")
            continue
        if include_all and cur is None and up.get("type") not in PRICED_TYPES:
            continue
        if include_all and cur is None and up["input"] == 0 and up["output"] == 0:
            continue
        try:
            new_in = rate_to_pusd(up["input"], file="upstream", key=f"{model}.input")
            new_out = rate_to_pusd(up["output"], file="upstream", key=f"{model}.output")
        except ConfigError as exc:
            lines.append(f"! {model}: {exc.problem}")
            continue
        ctx = up.get("context_length") if isinstance(up.get("context_length"), int) else None
        if cur is None:
            lines.append(f"+ {model}: input {up['input']} output {up['output']}")
            ratio = table.batch_discount
            models[model] = Rates(
                new_in,
                new_out,
                discounted(new_in, ratio),
                discounted(new_out, ratio),
                None,
                ctx,
                today,
                up.get("type"),
            )
            continue
        if (cur.input, cur.output) != (new_in, new_out):
            lines.append(
                f"~ {model}: input {pusd_rate_to_decimal(cur.input)} -> {up['input']}, "
                f"output {pusd_rate_to_decimal(cur.output)} -> {up['output']}"
            )
            ratio = table.batch_discount
            models[model] = replace(
                cur,
                input=new_in,
                output=new_out,
                batch_input=discounted(new_in, ratio),
                batch_output=discounted(new_out, ratio),
                read=today,
            )
        else:
            models[model] = replace(cur, read=today, context_length=cur.context_length or ctx)
    return lines, models


def sync(config: Config, *, upstream: str | None, check: bool, include_all: bool, dry_run: bool) -> int:
    key = os.environ.get("TOGETHER_API_KEY", "")
    if not key:
        print("error: TOGETHER_API_KEY is not set", file=sys.stderr)
        return 2
    base = upstream or config.upstream.url
    try:
        found = asyncio.run(fetch_upstream_prices(base, key))
    except (aiohttp.ClientError, RuntimeError, ValueError, TimeoutError) as exc:
        print(f"error: could not read prices from {base}: {exc}", file=sys.stderr)
        return 1
    lines, models = diff_prices(config.prices, found, include_all)
    drift = [line for line in lines if line.startswith(("~", "+", "!"))]
    for line in lines:
        print(line)
    if check:
        if drift:
            print(
                f"price drift: {len(drift)} difference(s) between {config.prices_file} and {base}",
                file=sys.stderr,
            )
            return 1
        print(f"prices in {config.prices_file} match {base} ({len(config.prices)} models)")
        return 0
    if not drift:
        print(f"no rate changes ({len(config.prices)} models checked)")
    if dry_run:
        return 0
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    table = replace(
        config.prices, models=models, extra={**config.prices.extra, "synced_at": now, "source": base}
    )
    text = dump_price_table(table)
    parse_price_table(yaml.safe_load(text), config.prices_file)  # round-trips
    path = Path(config.prices_file)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path} ({len(models)} models, synced_at {now})")
    return 0
