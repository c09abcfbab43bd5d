"""The simulator prices as together does: cached_input in its catalogue and bill, per-model batch rates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from proxy.simulator import FLAT_CACHED, RunningSimulator, SimulatorOptions, billed_pusd, start

LLAMA = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # cached_input 0.22, usage details, 50 % off batches
V3 = "deepseek-ai/DeepSeek-V3"  # cached_input 0.50, `cached_tokens` flat, batches at serverless rates
SEED = "arcee-ai/maestro-reasoning"  # no cached rate
AUTH = {"Authorization": "Bearer test-key"}
MESSAGES = [{"role": "user", "content": "Summarise the meter's price table, please, in one line."}]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start(options=SimulatorOptions(batch_delay_ms=0))
    yield running
    await running.stop()


async def call(sim: RunningSimulator, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, sim.url + path, json=body, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json(content_type=None)


def pusd(tokens: int, usd_per_mtok: str) -> int:
    return int(tokens * Decimal(usd_per_mtok) * 10**6)


async def test_the_catalogue_publishes_cached_input_only_where_there_is_one(sim: RunningSimulator) -> None:
    """GET /v1/models carries pricing.cached_input as a JSON number for the models that have one."""
    models = {m["id"]: m["pricing"] for m in await call(sim, "GET", "/models")}
    assert (models[LLAMA]["cached_input"], models[V3]["cached_input"]) == (0.22, 0.5)
    assert "cached_input" not in models[SEED]
    assert set(models[SEED]) == {"hourly", "input", "output", "base", "finetune"}


@pytest.mark.parametrize(("model", "flat"), [(LLAMA, False), (V3, True)])
async def test_cached_tokens_are_reported_in_together_shapes_and_billed_at_the_cached_rate(
    sim: RunningSimulator, model: str, flat: bool
) -> None:
    """simulate.cached_tokens: reported (details, or flat on FLAT_CACHED) and billed at cached_input."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "simulate": {"cached_tokens": 7}}
    usage = (await call(sim, "POST", "/chat/completions", body))["usage"]
    assert (model in FLAT_CACHED) is flat
    got = usage["cached_tokens"] if flat else usage["prompt_tokens_details"]["cached_tokens"]
    assert got == 7 and usage["completion_tokens"] == 4
    (entry,) = sim.billed.entries
    rates = {LLAMA: ("0.88", "0.22"), V3: ("1.25", "0.5")}[model]
    want = pusd(usage["prompt_tokens"] - 7, rates[0]) + pusd(7, rates[1]) + pusd(4, rates[0])
    assert billed_pusd(entry) == want == sim.billed.total_pusd()


async def test_streamed_usage_carries_cached_and_reasoning_counts(sim: RunningSimulator) -> None:
    """On a stream the usage chunk has the cached count (capped at the prompt) and the reasoning count."""
    body = {
        "model": LLAMA,
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "simulate": {"cached_tokens": 10_000, "reasoning_tokens": 3, "usage": "last"},
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(sim.url + "/chat/completions", json=body, headers=AUTH) as r,
    ):
        raw = await r.read()
    chunks = [json.loads(b[6:]) for b in raw.split(b"\n\n") if b.startswith(b"data: {")]
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]  # capped
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3} and usage["completion_tokens"] == 5
    (entry,) = sim.billed.entries
    assert billed_pusd(entry) == pusd(usage["prompt_tokens"], "0.22") + pusd(5, "0.88")


async def test_reasoning_tokens_are_inside_completion_and_billed_once(sim: RunningSimulator) -> None:
    """reasoning_tokens is a detail of completion_tokens: the bill is that of the completion count alone."""
    body = {"model": SEED, "messages": MESSAGES, "max_tokens": 6, "simulate": {"reasoning_tokens": 4}}
    usage = (await call(sim, "POST", "/chat/completions", body))["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 4} and usage["completion_tokens"] == 6
    assert billed_pusd(sim.billed.entries[0]) == pusd(usage["prompt_tokens"], "0.90") + pusd(6, "3.30")


async def test_without_the_knobs_usage_has_no_details(sim: RunningSimulator) -> None:
    """A request that asks for nothing gets the plain usage object, as before."""
    usage = (await call(sim, "POST", "/chat/completions", {"model": LLAMA, "messages": MESSAGES}))["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_batch_lines_are_billed_at_each_models_batch_rates(sim: RunningSimulator) -> None:
    """Llama's lines at 50 % off (its cached tokens at that batch input rate), DeepSeek-V3's at serverless."""
    lines = [
        {
            "custom_id": "a",
            "body": {"model": LLAMA, "messages": MESSAGES, "max_tokens": 3, "simulate": {"cached_tokens": 5}},
        },
        {
            "custom_id": "b",
            "body": {"model": V3, "messages": MESSAGES, "max_tokens": 3, "simulate": {"cached_tokens": 5}},
        },
    ]
    form = aiohttp.FormData()
    form.add_field("purpose", "batch-api")
    form.add_field("file", b"\n".join(json.dumps(x).encode() for x in lines), filename="in.jsonl")
    async with aiohttp.ClientSession() as s, s.post(sim.url + "/files/upload", data=form, headers=AUTH) as r:
        file_id = (await r.json())["id"]
    job = (
        await call(sim, "POST", "/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions"})
    )["job"]
    for _ in range(100):
        if (await call(sim, "GET", f"/batches/{job['id']}"))["status"] == "COMPLETED":
            break
        await asyncio.sleep(0.01)
    llama, v3 = sim.billed.entries
    assert llama["rates"] == {"input": "0.44", "output": "0.44", "cached_input": "0.44"}
    assert v3["rates"] == {"input": "1.25", "output": "1.25", "cached_input": "1.25"}
    assert billed_pusd(llama) == pusd(llama["prompt_tokens"] + 3, "0.44")
    assert billed_pusd(v3) == pusd(v3["prompt_tokens"] + 3, "1.25")
