"""Prices exactly as the upstream bills: cached input synced from GET /v1/models, per-model batch rates.

The price table is synced from a simulator with `prices sync`'s own functions, then the ledger of a
proxy in front of another simulator (same catalogue) must equal that simulator's bill to the
pico-dollar: serverless requests with cached and reasoning tokens (both usage shapes, streaming
and not), and batch lines of a discounted and of a non-discounted model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from proxy import simulator
from proxy.cli.prices import diff_prices, fetch_upstream_prices
from proxy.config import Config, load_config
from proxy.core.pricing import BATCH_DISCOUNT, BATCH_NONE, PriceTable, format_usd
from proxy.ledger import LedgerRow
from proxy.simulator import billed_pusd

from .support import ACME_ONLY_MODEL, CHAT_MODEL, CONFIG_PATH, MESSAGES, Meter, StartMeter
from .test_batches import batch_input, batch_rows, create_batch, fast_polling, upload

DETAILS_MODEL = CHAT_MODEL  # cached_input 0.22 upstream, usage.prompt_tokens_details; batches 50 % off
FLAT_MODEL = (
    ACME_ONLY_MODEL  # deepseek-ai/DeepSeek-V3: cached_input 0.5, `cached_tokens` flat; no batch discount
)


async def synced_prices(config: Config) -> PriceTable:
    """config/prices.yaml after `prices sync` against the simulator's catalogue."""
    sim = await simulator.start()
    try:
        found = await fetch_upstream_prices(sim.url, "operator-key")
    finally:
        await sim.stop()
    changes, models = diff_prices(config.prices, found, include_all=False)
    assert {c.text for c in changes if c.drift} == {
        f"~ {DETAILS_MODEL}: cached_input - -> 0.22",
        f"~ {FLAT_MODEL}: cached_input - -> 0.5",
    }
    return replace(config.prices, models=models)


@pytest.fixture
async def meter(start_meter: StartMeter) -> AsyncIterator[Meter]:
    prices = await synced_prices(load_config(CONFIG_PATH))
    async with start_meter(change=lambda c: fast_polling(replace(c, prices=prices))) as m:
        yield m


def billed_by_id(meter: Meter) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in meter.sim.billed.entries}


async def ask(meter: Meter, model: str, cached: int, reasoning: int, stream: bool) -> None:
    """One chat request through the proxy with the openai SDK, the simulator told what to report."""
    extra = {"simulate": {"cached_tokens": cached, "reasoning_tokens": reasoning}}
    client = meter.openai("acme")
    if not stream:
        await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=9, extra_body=extra)
        return
    chunks = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=9, stream=True, extra_body=extra
    )
    async for _ in chunks:
        pass


async def test_cached_and_reasoning_tokens_are_billed_exactly_as_upstream(meter: Meter) -> None:
    """Cache hits and reasoning tokens: rows equal the simulator's bill; report and metrics show them."""
    for model in (DETAILS_MODEL, FLAT_MODEL):
        for stream in (False, True):
            await ask(meter, model, cached=12, reasoning=5, stream=stream)
    rows = [r for r in await meter.wait_terminal(4) if r.endpoint == "chat"]
    billed = billed_by_id(meter)
    assert len(rows) == 4 and len(billed) == 4
    for row in rows:
        entry = billed[row.upstream_id or ""]
        assert (row.status, row.usage_source, row.cached_tokens, row.reasoning_tokens) == (
            "ok",
            "upstream",
            12,
            5,
        )
        assert (row.prompt_tokens, row.completion_tokens) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        )
        assert row.cost_pusd == billed_pusd(entry) is not None
    assert sum(r.cost_pusd or 0 for r in rows) == meter.sim.billed.total_pusd()
    saved = {DETAILS_MODEL: 2 * 12 * (880_000 - 220_000), FLAT_MODEL: 2 * 12 * (1_250_000 - 500_000)}
    await _report_shows_the_cache(meter, rows[0], saved)
    await _metrics_show_the_cache(meter, saved)


async def _report_shows_the_cache(meter: Meter, row: LedgerRow, saved: dict[str, int]) -> None:
    auth = {"Authorization": f"Bearer {meter.admin_token}"}
    status, body = await meter.admin_get(f"/admin/report?month={row.period}&by=model", auth)
    assert status == 200, body
    groups = {g["key"]: g for g in json.loads(body)["groups"]}
    for model, pusd in saved.items():
        assert groups[model]["cached_tokens"] == 24
        assert groups[model]["cache_savings_usd"] == format_usd(pusd)


async def _metrics_show_the_cache(meter: Meter, saved: dict[str, int]) -> None:
    samples = await meter.metric_samples()
    cached = samples["together_meter_cached_tokens_total"]
    savings = samples["together_meter_cache_savings_usd_total"]
    for model, pusd in saved.items():
        assert sum(v for k, v in cached.items() if ("model", model) in k) == 24
        assert sum(v for k, v in savings.items() if ("model", model) in k) == pytest.approx(pusd / 1e12)


async def test_batch_lines_of_a_non_discounted_model_cost_the_serverless_rates(meter: Meter) -> None:
    """Batch lines (cache hits, discounted or not) equal the simulator's bill; non-discounted = serverless."""
    prices = meter.config.prices
    assert (prices.models[DETAILS_MODEL].batch, prices.models[FLAT_MODEL].batch) == (
        BATCH_DISCOUNT,
        BATCH_NONE,
    )
    lines = [
        {
            "custom_id": f"req-{i}",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Summarise ticket {i} please."}],
                "max_tokens": 4 + i,
                "simulate": {"cached_tokens": 3},
            },
        }
        for i, model in enumerate((FLAT_MODEL, DETAILS_MODEL, FLAT_MODEL))
    ]
    info = await upload(meter, batch_input(lines))
    await create_batch(meter, info["id"])
    rows = await batch_rows(meter, 3)
    billed = [e for e in meter.sim.billed.entries if e.get("mode") == "batch"]
    for row, entry in zip(rows, billed, strict=True):
        assert (row.model, row.cached_tokens) == (entry["model"], 3)
        assert row.cost_pusd == billed_pusd(entry) is not None
        if row.model == FLAT_MODEL:  # no batch discount: the whole prompt at 1.25, cached tokens included
            assert (
                row.cost_pusd
                == (row.prompt_tokens or 0) * 1_250_000 + (row.completion_tokens or 0) * 1_250_000
            )
        else:  # 50 % off; cached tokens at the batch input rate (no cached rate for batches)
            assert row.cost_pusd == ((row.prompt_tokens or 0) + (row.completion_tokens or 0)) * 440_000
    assert sum(r.cost_pusd or 0 for r in rows) == sum(billed_pusd(e) or 0 for e in billed)
