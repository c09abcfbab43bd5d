"""The real `together` SDK 3.x (base URL without /v1) through the proxy, and model listings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from together import AsyncTogether, Together

from proxy.simulator import TOKEN_MODELS

from .support import CHAT_MODEL, EMBEDDING_MODEL, MESSAGES, Meter, post_raw

ATTRIBUTION = {"X-Meter-Feature": "summarize", "X-Meter-Environment": "prod"}


@pytest.fixture
async def together(meter: Meter) -> AsyncIterator[AsyncTogether]:
    async with AsyncTogether(
        api_key=meter.keys["acme"], base_url=meter.origin, max_retries=0, timeout=20
    ) as client:
        yield client


async def test_chat_non_stream(meter: Meter, together: AsyncTogether) -> None:
    """A together chat answer passes through; its row and cost header match the bill."""
    raw = await together.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=4, extra_headers=ATTRIBUTION
    )
    r = await raw.parse()
    (entry,) = meter.sim.billed.entries
    assert r.id == entry["id"] and r.choices[0].message is not None
    assert r.choices[0].message.content == "Hello from the simulated"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (entry["prompt_tokens"], 4)
    (row,) = await meter.rows()
    assert raw.headers["x-request-id"] == row.request_id
    assert raw.headers["x-meter-cost-usd"] == meter.cost_text(CHAT_MODEL, entry["prompt_tokens"], 4)
    assert (row.status, row.tenant, row.model, row.endpoint, row.stream) == (
        "ok",
        "acme",
        CHAT_MODEL,
        "chat",
        False,
    )
    assert (row.feature, row.environment, row.usage_source) == ("summarize", "prod", "upstream")
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 4)
    assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], 4)


async def test_chat_stream(meter: Meter, together: AsyncTogether) -> None:
    """A together chat stream parses through the proxy (cost comment included); row = bill."""
    raw = await together.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=6, stream=True, extra_headers=ATTRIBUTION
    )
    chunks = [c async for c in await raw.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello from the simulated together upstream"
    )
    (entry,) = meter.sim.billed.entries
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert entry["body"]["stream_options"] == {"include_usage": True}
    (row,) = await meter.rows()
    assert raw.headers["x-request-id"] == row.request_id
    assert (row.status, row.stream, row.stream_complete, row.usage_source) == ("ok", True, True, "upstream")
    assert (row.feature, row.environment) == ("summarize", "prod")
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 6)
    assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], 6)


async def test_embeddings(meter: Meter, together: AsyncTogether) -> None:
    """together embeddings pass through; the row is estimated: prompt tokens only, output 0."""
    r = await together.embeddings.create(
        model=EMBEDDING_MODEL, input=["a meter", "a bill"], extra_headers=ATTRIBUTION
    )
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 8
    (entry,) = meter.sim.billed.entries
    (row,) = await meter.rows()
    assert (row.status, row.endpoint, row.usage_source) == ("ok", "embeddings", "estimated")
    assert row.prompt_tokens == entry["prompt_tokens"] > 0 and row.completion_tokens == 0
    assert row.cost_pusd == meter.cost(EMBEDDING_MODEL, entry["prompt_tokens"], 0)


async def test_project_models_list(meter: Meter) -> None:
    """Together(project_id=...).models.list() works: GET /v2/projects/p/models is passed on."""

    def list_models() -> list[str]:
        with Together(
            api_key=meter.keys["acme"], base_url=meter.origin, project_id="p", max_retries=0, timeout=20
        ) as client:
            return [f"{m.project_id}:{m.id}" for m in client.models.list()]

    listed = await asyncio.to_thread(list_models)
    assert len(listed) == len(TOKEN_MODELS) and f"p:{CHAT_MODEL}" in listed
    assert all(m.startswith("p:") for m in listed)
    (seen,) = meter.upstream_seen
    assert (seen["method"], seen["path"]) == ("GET", "/v2/projects/p/models")
    assert seen["headers"]["authorization"] == f"Bearer {meter.operator_key}"


async def test_models_bare_array_byte_for_byte(meter: Meter) -> None:
    """GET /v1/models through the proxy is the upstream's bare JSON array, byte for byte."""
    status, headers, proxied = await post_raw(meter.base_url + "/models", None, meter.auth(), method="GET")
    dstatus, _, direct = await post_raw(
        meter.sim.url + "/models", None, {"Authorization": f"Bearer {meter.operator_key}"}, method="GET"
    )
    assert (status, dstatus) == (200, 200)
    assert proxied == direct
    models = orjson.loads(proxied)
    assert isinstance(models, list) and {CHAT_MODEL, "black-forest-labs/FLUX.1-schnell"} <= {
        m["id"] for m in models
    }
    assert headers["content-type"].startswith("application/json")
    assert [s["path"] for s in meter.upstream_seen] == ["/v1/models", "/v1/models"]


async def test_base_url_with_v1_is_served_too(meter: Meter) -> None:
    """A 3.x user who adds /v1 (the SDK then asks for /v1/v1/... and /v1/v2/...) is served, not
    404: the chat is metered once and the project listing is passed on as /v2/projects/p/models."""
    async with AsyncTogether(
        api_key=meter.keys["acme"], base_url=meter.base_url, project_id="p", max_retries=0, timeout=20
    ) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=3
        )
        r = await raw.parse()
        listed = [m.id async for m in await client.models.list()]
    assert r.choices[0].message is not None and r.choices[0].message.content == "Hello from the"
    assert len(listed) == len(TOKEN_MODELS)
    (entry,) = meter.sim.billed.entries
    (row,) = await meter.rows()
    assert (row.request_id, row.endpoint, row.status) == (raw.headers["x-request-id"], "chat", "ok")
    assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], 3)
    assert [(s["method"], s["path"]) for s in meter.upstream_seen] == [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v2/projects/p/models"),
    ]
