"""The cost in the response body (`X-Meter-Cost: usage`, or `cost_in_body` per tenant), read
from the parsed objects of the real `openai` and `together` SDKs and LangChain's ChatOpenAI."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import orjson
import pytest
from together import AsyncTogether

from proxy.config import Config
from proxy.core.pricing import format_usd

from .support import CHAT_MODEL, EMBEDDING_MODEL, MESSAGES, Meter, StartMeter, error_of, post_raw

OPT_IN = {"X-Meter-Cost": "usage"}


def usd(value: Any) -> Decimal:
    """A JSON number the SDK parsed (a float) back to its decimal text."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))


async def ledger_cost(meter: Meter, request_id: str) -> Decimal:
    row = await meter.row(request_id)
    assert row.cost_pusd is not None
    return Decimal(format_usd(row.cost_pusd))


async def test_openai_sdk_reads_usage_cost(meter: Meter) -> None:
    """Non-streaming: usage.cost is the ledger's exact cost, in the body's own JSON text."""
    client = meter.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=5, extra_headers=OPT_IN
    )
    r = raw.parse()
    cost = await ledger_cost(meter, raw.headers["x-request-id"])
    assert r.usage is not None and usd(r.usage.model_extra["cost"]) == cost
    assert f'"cost":{raw.headers["x-meter-cost-usd"]}'.encode() in raw.http_response.content


async def test_openai_sdk_stream_reads_usage_cost_on_the_usage_chunk(meter: Meter) -> None:
    """Streams: the chunk carrying usage has usage.cost, even when the client did not ask for
    the usage chunk itself; it equals the row committed before [DONE]."""
    client = meter.openai()
    stream = await client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=6, stream=True, extra_headers=OPT_IN
    )
    costs = [c.usage.model_extra["cost"] async for c in stream if c.usage is not None]
    (row,) = await meter.rows()
    assert row.cost_pusd is not None and [usd(c) for c in costs] == [Decimal(format_usd(row.cost_pusd))]


async def test_together_sdk_reads_usage_cost(meter: Meter) -> None:
    """The together SDK (3.x) exposes the same field on its parsed usage object."""
    async with AsyncTogether(api_key=meter.keys["acme"], base_url=meter.origin, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=3, extra_headers=OPT_IN
        )
        r = await raw.parse()
    assert r.usage is not None
    cost = getattr(r.usage, "cost", None)
    if cost is None:  # pydantic keeps unknown fields in model_extra
        cost = (r.usage.model_extra or {})["cost"]
    assert usd(cost) == await ledger_cost(meter, raw.headers["x-request-id"])


async def test_langchain_chat_openai_reads_usage_cost(meter: Meter) -> None:
    """LangChain's ChatOpenAI keeps the raw usage in response_metadata['token_usage']."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=meter.base_url,
        api_key=meter.keys["acme"],  # type: ignore[arg-type]
        max_retries=0,
        max_tokens=4,  # type: ignore[call-arg]
        default_headers=OPT_IN,
    )
    message = await llm.ainvoke("How much did this cost?")
    (row,) = await meter.rows()
    assert row.cost_pusd is not None
    assert usd(message.response_metadata["token_usage"]["cost"]) == Decimal(format_usd(row.cost_pusd))


async def test_without_opt_in_the_body_is_together_s(meter: Meter) -> None:
    """No header, no tenant setting: no cost field, and the bytes equal the upstream's."""
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 3}
    status, headers, data = await post_raw(f"{meter.base_url}/chat/completions", body, meter.auth())
    assert status == 200 and b'"cost"' not in data
    assert "usage" in orjson.loads(data) and "x-meter-cost-usd" in headers


async def test_embeddings_without_usage_stay_unchanged(meter: Meter) -> None:
    """together's embeddings carry no usage object: nothing is added, the header has the cost."""
    body = {"model": EMBEDDING_MODEL, "input": "hello"}
    headers = {**meter.auth(), **OPT_IN}
    status, answer_headers, data = await post_raw(f"{meter.base_url}/embeddings", body, headers)
    assert status == 200 and b'"cost"' not in data and answer_headers["x-meter-cost-usd"] != "unknown"


async def test_a_bad_header_value_is_refused(meter: Meter) -> None:
    """X-Meter-Cost takes 'usage' or 'none'; anything else is a 400 before anything is forwarded."""
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 3}
    headers = {**meter.auth(), "X-Meter-Cost": "yes please"}
    status, _, data = await post_raw(f"{meter.base_url}/chat/completions", body, headers)
    assert status == 400 and error_of(data)["code"] == "invalid_field"
    assert meter.sim.billed.entries == []


def cost_for_acme(config: Config) -> Config:
    tenants = dict(config.tenants)
    tenants["acme"] = replace(tenants["acme"], cost_in_body=True)
    return replace(config, tenants=tenants)


@pytest.mark.sqlite_only
async def test_tenant_default_and_per_request_opt_out(start_meter: StartMeter) -> None:
    """cost_in_body: true puts the cost in every answer of that tenant; `X-Meter-Cost: none`
    opts one request out; other tenants are unaffected."""
    async with start_meter(change=cost_for_acme) as meter:
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 3}
        url = f"{meter.base_url}/chat/completions"
        _, headers, data = await post_raw(url, body, meter.auth("acme"))
        assert orjson.loads(data)["usage"]["cost"] == float(headers["x-meter-cost-usd"])
        _, _, data = await post_raw(url, body, {**meter.auth("acme"), "X-Meter-Cost": "none"})
        assert "cost" not in orjson.loads(data)["usage"]
        _, _, data = await post_raw(url, body, meter.auth("globex"))
        assert "cost" not in orjson.loads(data)["usage"]
