"""`prices list` and `prices sync`: the price table against the upstream's GET /v1/models.

`sync` changes only what the upstream publishes (`input`, `output`, `cached_input`, a missing
`context_length`, `read`); everything set by hand (`batch`, hand-set batch rates, a
`cached_input` the upstream does not publish, `note`, `type`, the file's leading comments) is
kept. Its diff names each field it changes, with the old and the new value.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

from proxy.config import Config
from proxy.config.prices import dump_price_table, unit_price_text
from proxy.core.pricing import (
    BATCH_NONE,
    BATCH_UNKNOWN,
    PriceTable,
    Rates,
    batch_rate,
    parse_price_table,
    pusd_rate_to_decimal,
    rate_to_pusd,
    unit_price_to_pusd,
)
from proxy.errors import ConfigError

PRICED_TYPES = {"chat", "language", "code", "embedding", "moderation", "rerank"}
# together's media model types and the unit each is billed in; their price per unit is read from
# `pricing.base` (docs/configuration.md#price-table-pricesyaml says why)
UNIT_TYPES = {
    "image": "megapixel",
    "audio": "audio_second",
    "transcribe": "audio_second",
    "video": "video_second",
}


def _usd(rate: int | None) -> str:
    """A rate as USD per 1M tokens ('0.88'), '-' for none."""
    return "-" if rate is None else str(pusd_rate_to_decimal(rate))


def price_rows(table: PriceTable) -> list[dict[str, Any]]:
    """Each model's rates (USD per 1M tokens, exact decimal strings) and what it says of batches."""
    rows: list[dict[str, Any]] = []
    for model in sorted(table.models, key=lambda m: (m.lower(), m)):
        r = table.models[model]
        if not r.by_token:
            rows.append(_unit_row(model, r))
            continue
        rows.append(
            {
                "model": model,
                "input": _usd(r.input),
                "output": _usd(r.output),
                "cached_input": None if r.cached_input is None else _usd(r.cached_input),
                "batch_input": _usd(r.batch_input),
                "batch_output": _usd(r.batch_output),
                "batch": r.batch,
                "batch_discount": None if r.batch_discount is None else str(r.batch_discount),
                "batch_terms": r.batch_terms,
                "context_length": r.context_length,
                "read": r.read,
                "note": r.note,
                "unit": "token",
                "per_unit": None,
            }
        )
    return rows


def _unit_row(model: str, r: Rates) -> dict[str, Any]:
    """A model priced per megapixel, image or second: no token rates, its price per unit."""
    return {
        "model": model,
        **dict.fromkeys(("input", "output", "cached_input", "batch_input", "batch_output")),
        "batch": r.batch,
        "batch_discount": None,
        "batch_terms": "no batch API for this model",
        "context_length": None,
        "read": r.read,
        "note": r.note,
        "unit": r.unit,
        "per_unit": unit_price_text(r.per_unit or 0),
        "default_steps": r.default_steps,
    }


def list_prices(config: Config, fmt: str) -> int:
    """`prices list`: every model's rates and batch terms, as a table or JSON."""
    table = config.prices
    rows = price_rows(table)
    if fmt == "json":
        print(json.dumps({"source": table.source, "unit": "USD per 1M tokens", "models": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{table.source} (USD per 1M tokens)")
    heads = ("model", "input", "output", "cached in", "batch in", "batch out", "batch", "context", "read")
    per_unit = [row for row in rows if row["unit"] != "token"]
    rows = [row for row in rows if row["unit"] == "token"]
    for col in heads:
        t.add_column(col, justify="left" if col in ("model", "batch") else "right")
    for row in rows:
        t.add_row(
            *(str(row[k]) for k in ("model", "input", "output")),
            row["cached_input"] or "-",
            *(str(row[k]) for k in ("batch_input", "batch_output", "batch_terms")),
            str(row["context_length"] or ""),
            str(row["read"] or ""),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(t)
    if per_unit:
        console.print(_unit_table(table.source, per_unit))
    return 0


def models_url(base_url: str) -> str:
    """`<base>/models` for a base URL with a path (`.../v1`); `<origin>/v1/models` for a bare
    origin (`https://api.together.ai`), as the proxy itself sends `/v1` paths there."""
    base = base_url.rstrip("/")
    return base + ("/models" if urlsplit(base).path else "/v1/models")


def _unit_table(source: str, rows: list[dict[str, Any]]) -> Any:
    """Models together bills per megapixel, image or second of audio or video."""
    from rich.table import Table

    t = Table(title=f"{source} (USD per unit)")
    for col in ("model", "unit", "per unit", "default steps", "read"):
        t.add_column(col, justify="right" if col in ("per unit", "default steps") else "left")
    for row in rows:
        steps = row.get("default_steps")
        t.add_row(
            row["model"],
            row["unit"],
            row["per_unit"],
            "" if steps is None else str(steps),
            str(row["read"] or ""),
        )
    return t


async def fetch_upstream_prices(base_url: str, api_key: str) -> dict[str, dict[str, Any]]:
    """model id -> {input, output, cached_input (Decimal USD per 1M or None), context_length, type}."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
        session.get(
            models_url(base_url),
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
        if isinstance(pricing, dict):
            found[item["id"]] = upstream_entry(item, pricing)
    return found


def upstream_entry(item: dict[str, Any], pricing: dict[str, Any]) -> dict[str, Any]:
    """What `sync` takes from one model object. A `cached_input` of 0 or none means: no cached rate."""
    cached = pricing.get("cached_input")
    base = pricing.get("base")
    return {
        "per_unit": Decimal(str(base)) if item.get("type") in UNIT_TYPES and base not in (None, 0) else None,
        "input": Decimal(str(pricing.get("input", 0))),
        "output": Decimal(str(pricing.get("output", 0))),
        "cached_input": Decimal(str(cached)) if cached not in (None, 0) else None,
        "context_length": item.get("context_length"),
        "type": item.get("type"),
    }


@dataclass(frozen=True, slots=True)
class Change:
    """One line of the sync diff; `drift` when it changes a rate (what `--check` fails on)."""

    text: str
    drift: bool


def diff_prices(
    table: PriceTable, upstream: dict[str, dict[str, Any]], include_all: bool
) -> tuple[list[Change], dict[str, Rates]]:
    """The diff, field by field, and the updated model -> Rates mapping."""
    today = dt.date.today().isoformat()
    changes: list[Change] = []
    models = dict(table.models)
    for model in sorted(set(models) | (set(upstream) if include_all else set())):
        up, cur = upstream.get(model), models.get(model)
        if up is None:
            changes.append(Change(f"- {model}: not offered by the upstream any more (kept)", False))
            continue
        if cur is None and not _worth_adding(up):
            continue
        try:
            change, rates = sync_model(model, cur, up, today)
        except ConfigError as exc:
            changes.append(Change(f"! {model}: {exc.key.rsplit('.', 1)[-1]} {exc.problem}", True))
            continue
        models[model] = rates
        if change is not None:
            changes.append(change)
    return changes, models


def _worth_adding(up: dict[str, Any]) -> bool:
    """`--all`: a model the table lacks is added when it is a priced type with a non-zero rate."""
    if up.get("type") in UNIT_TYPES:
        return up.get("per_unit") is not None
    return up.get("type") in PRICED_TYPES and not (up["input"] == 0 and up["output"] == 0)


def sync_unit_model(
    model: str, cur: Rates | None, up: dict[str, Any], today: str
) -> tuple[Change | None, Rates]:
    """A model billed per megapixel, image or second: its `per_unit` from the upstream's `base`
    (a unit set by hand, e.g. `image` for a model priced per image, is kept)."""
    per_unit = unit_price_to_pusd(up["per_unit"], file="upstream", key=f"{model}.per_unit")
    if cur is None:
        unit = UNIT_TYPES[up["type"]]
        added = Rates(
            0, 0, 0, 0, read=today, type=up.get("type"), batch=BATCH_NONE, unit=unit, per_unit=per_unit
        )
        return Change(f"+ {model}: per_unit {unit_price_text(per_unit)} per {unit}", True), added
    new = replace(cur, per_unit=per_unit, read=today)
    if cur.per_unit == per_unit:
        return None, new
    old = "-" if cur.per_unit is None else unit_price_text(cur.per_unit)
    return Change(f"~ {model}: per_unit {old} -> {unit_price_text(per_unit)} (per {cur.unit})", True), new


def sync_model(model: str, cur: Rates | None, up: dict[str, Any], today: str) -> tuple[Change | None, Rates]:
    """One model brought up to the upstream's rates; ConfigError when they are not valid rates."""
    if cur is not None and not cur.by_token:
        return (None, cur) if up.get("per_unit") is None else sync_unit_model(model, cur, up, today)
    if cur is None and up.get("per_unit") is not None:
        return sync_unit_model(model, None, up, today)
    new_in = rate_to_pusd(up["input"], file="upstream", key=f"{model}.input")
    new_out = rate_to_pusd(up["output"], file="upstream", key=f"{model}.output")
    cached = up.get("cached_input")
    new_cached = (
        None if cached is None else rate_to_pusd(cached, file="upstream", key=f"{model}.cached_input")
    )
    if new_cached is not None and new_cached > new_in:
        raise ConfigError(
            "upstream", f"{model}.cached_input", f"{cached} is above the input rate {up['input']}"
        )
    ctx = up.get("context_length") if type(up.get("context_length")) is int else None
    if cur is None:
        added = Rates(new_in, new_out, new_in, new_out, new_cached, ctx, today, up.get("type"), BATCH_UNKNOWN)
        cached_text = "" if new_cached is None else f" cached_input {_usd(new_cached)}"
        text = f"+ {model}: input {_usd(new_in)} output {_usd(new_out)}{cached_text}; batch unknown"
        return Change(text + " (no batch discount known: set `batch` by hand)", True), added
    new = _updated(cur, new_in, new_out, new_cached, ctx, today)
    if new.cached_input is not None and new.cached_input > new_in:  # a hand-set one, kept
        raise ConfigError(
            "upstream",
            f"{model}.cached_input",
            f"{_usd(new.cached_input)} (set by hand) is above the new input rate {_usd(new_in)}",
        )
    return _describe(model, cur, new), new


def _updated(
    cur: Rates, new_in: int, new_out: int, new_cached: int | None, ctx: int | None, today: str
) -> Rates:
    """`cur` with the upstream's rates; batch rates that followed the old rates follow the new ones."""
    batch_in, batch_out = cur.batch_input, cur.batch_output
    if batch_in == batch_rate(cur.input, cur.batch, cur.batch_discount):  # derived, not set by hand
        batch_in = batch_rate(new_in, cur.batch, cur.batch_discount)
    if batch_out == batch_rate(cur.output, cur.batch, cur.batch_discount):
        batch_out = batch_rate(new_out, cur.batch, cur.batch_discount)
    return replace(
        cur,
        input=new_in,
        output=new_out,
        cached_input=cur.cached_input if new_cached is None else new_cached,  # hand-set: kept
        batch_input=batch_in,
        batch_output=batch_out,
        context_length=cur.context_length or ctx,
        read=today,
    )


_RATE_FIELDS = ("input", "output", "cached_input", "batch_input", "batch_output")


def _describe(model: str, cur: Rates, new: Rates) -> Change | None:
    """`~ model: input 0.88 -> 0.95, ...`: each field that changes; hand-set batch rates kept."""
    parts = [
        f"{name} {_usd(getattr(cur, name))} -> {_usd(getattr(new, name))}"
        for name in _RATE_FIELDS
        if getattr(cur, name) != getattr(new, name)
    ]
    for name, base in (("batch_input", "input"), ("batch_output", "output")):
        if getattr(cur, base) != getattr(new, base) and getattr(cur, name) == getattr(new, name):
            parts.append(f"{name} {_usd(getattr(cur, name))} kept (set by hand)")
    if parts:
        return Change(f"~ {model}: {', '.join(parts)}", True)
    if new.context_length != cur.context_length:
        return Change(f"= {model}: context_length - -> {new.context_length}", False)
    return None


def sync(config: Config, *, upstream: str | None, check: bool, include_all: bool, dry_run: bool) -> int:
    """`prices sync`: print the field-by-field diff against the upstream, then write (unless told not)."""
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
    changes, models = diff_prices(config.prices, found, include_all)
    drift = [c for c in changes if c.drift]
    for change in changes:
        print(change.text)
    if check:
        return _check_result(config, base, len(drift))
    if not drift:
        print(f"no rate changes ({len(config.prices)} models checked)")
    if dry_run:
        return 0
    return _write(config, base, models, sum(1 for m in models if m in found))


def _check_result(config: Config, base: str, drift: int) -> int:
    """`--check`: exit 1 on any price drift, else 0."""
    if drift:
        print(f"price drift: {drift} difference(s) between {config.prices_file} and {base}", file=sys.stderr)
        return 1
    print(f"prices in {config.prices_file} match {base} ({len(config.prices)} models)")
    return 0


def _write(config: Config, base: str, models: dict[str, Rates], listed: int) -> int:
    """Write the synced table (atomically, after checking it parses back to the same rates)."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    table = replace(
        config.prices, models=models, extra={**config.prices.extra, "synced_at": now, "source": base}
    )
    text = dump_price_table(table)
    again = parse_price_table(yaml.safe_load(text), config.prices_file)
    if dict(again.models) != models:  # never expected: refuse rather than write other rates
        print(f"error: {config.prices_file} would not read back as synced; nothing written", file=sys.stderr)
        return 1
    path = Path(config.prices_file)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    print(f"read: set to {dt.date.today().isoformat()} on the {listed} model(s) the upstream lists")
    print(f"wrote {path} ({len(models)} models, synced_at {now})")
    return 0
