"""The real `openai` SDK through the real proxy: answers unchanged, one exact ledger row each."""

from __future__ import annotations

import struct
from typing import Any

from .support import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    LANGUAGE_MODEL,
    MESSAGES,
    Meter,
    post_raw,
)

ATTRIBUTION = {"X-Meter-Feature": "search", "X-Meter-Environment": "staging"}
PROMPT = "Once upon a time in a metered land"


def float32(vector: list[float]) -> list[float]:
    """`vector` rounded to float32, as a base64 embedding carries it."""
    return list(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))


def _dump(obj: Any) -> dict[str, Any]:
    """An SDK object without the fields that differ between two identical answers."""
    return obj.model_dump(exclude={"id", "created"})


async def _check_row(
    meter: Meter,
    request_id: str,
    *,
    model: str,
    endpoint: str,
    stream: bool,
    entry: dict[str, Any],
    source: str = "upstream",
) -> None:
    row = await meter.row(request_id)
    assert (row.status, row.tenant, row.model, row.endpoint, row.stream) == (
        "ok",
        "acme",
        model,
        endpoint,
        stream,
    )
    assert (row.feature, row.environment, row.mode) == ("search", "staging", "serverless")
    assert row.usage_source == source
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], entry["completion_tokens"])
    assert row.cost_pusd == meter.cost(model, entry["prompt_tokens"], entry["completion_tokens"])
    assert row.upstream_status == 200 and row.stream_complete


async def test_chat_non_stream(meter: Meter) -> None:
    """A chat answer equals the simulator's; its row and cost header match the billed tokens."""
    client = meter.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=5, extra_headers=ATTRIBUTION
    )
    r = raw.parse()
    (entry,) = meter.sim.billed.entries
    direct = await meter.direct_openai().chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=5
    )
    assert _dump(r) == _dump(direct)
    assert r.id == entry["id"]
    assert r.choices[0].message.content == "Hello from the simulated together"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (entry["prompt_tokens"], 5)
    (row,) = await meter.rows()
    assert raw.headers["x-request-id"] == row.request_id and row.upstream_id == entry["id"]
    assert raw.headers["x-meter-cost-usd"] == meter.cost_text(CHAT_MODEL, entry["prompt_tokens"], 5)
    assert raw.headers["x-meter-usage-source"] == "upstream"
    await _check_row(meter, row.request_id, model=CHAT_MODEL, endpoint="chat", stream=False, entry=entry)


async def test_chat_stream(meter: Meter) -> None:
    """A chat stream's chunks equal the simulator's; its row holds the billed tokens."""
    client = meter.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=6, stream=True, extra_headers=ATTRIBUTION
    )
    chunks = [c async for c in raw.parse()]
    (entry,) = meter.sim.billed.entries
    direct = await meter.direct_openai().chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=6, stream=True
    )
    assert [_dump(c) for c in chunks] == [_dump(c) async for c in direct]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        "Hello from the simulated together upstream"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert entry["completion_tokens"] == 6
    (row,) = await meter.rows()
    assert raw.headers["x-request-id"] == row.request_id
    assert raw.headers["content-type"].startswith("text/event-stream")
    await _check_row(meter, row.request_id, model=CHAT_MODEL, endpoint="chat", stream=True, entry=entry)


async def test_completions(meter: Meter) -> None:
    """Legacy completions, plain and streamed, equal the simulator's and bill exactly."""
    client = meter.openai()
    raw = await client.completions.with_raw_response.create(
        model=LANGUAGE_MODEL, prompt=PROMPT, max_tokens=4, extra_headers=ATTRIBUTION
    )
    r = raw.parse()
    sraw = await client.completions.with_raw_response.create(
        model=LANGUAGE_MODEL, prompt=PROMPT, max_tokens=3, stream=True, extra_headers=ATTRIBUTION
    )
    chunks = [c async for c in sraw.parse()]
    plain, streamed = meter.sim.billed.entries
    direct = meter.direct_openai()
    d = await direct.completions.create(model=LANGUAGE_MODEL, prompt=PROMPT, max_tokens=4)
    dchunks = [
        c
        async for c in await direct.completions.create(
            model=LANGUAGE_MODEL, prompt=PROMPT, max_tokens=3, stream=True
        )
    ]
    assert _dump(r) == _dump(d) and [_dump(c) for c in chunks] == [_dump(c) for c in dchunks]
    assert r.choices[0].text == "Hello from the simulated"
    assert "".join(c.choices[0].text for c in chunks) == "Hello from the"
    assert (plain["completion_tokens"], streamed["completion_tokens"]) == (4, 3)
    assert plain["prompt_tokens"] == streamed["prompt_tokens"] > 0
    assert raw.headers["x-meter-cost-usd"] == meter.cost_text(LANGUAGE_MODEL, plain["prompt_tokens"], 4)
    rows = await meter.rows()
    assert [r.request_id for r in rows] == [raw.headers["x-request-id"], sraw.headers["x-request-id"]]
    await _check_row(
        meter, rows[0].request_id, model=LANGUAGE_MODEL, endpoint="completions", stream=False, entry=plain
    )
    await _check_row(
        meter, rows[1].request_id, model=LANGUAGE_MODEL, endpoint="completions", stream=True, entry=streamed
    )


async def test_embeddings_estimated(meter: Meter) -> None:
    """Embeddings pass through unchanged; the row is estimated with prompt tokens and no output."""
    client = meter.openai()
    inputs = ["metering is counting", "pricing is multiplying"]
    raw = await client.embeddings.with_raw_response.create(
        model=EMBEDDING_MODEL, input=inputs, extra_headers=ATTRIBUTION
    )
    r = raw.parse()
    (entry,) = meter.sim.billed.entries
    direct = await meter.direct_openai().embeddings.create(model=EMBEDDING_MODEL, input=inputs)
    # the SDK asks for base64 by itself; the proxy answers base64 float32 as OpenAI does (the
    # simulator, like together, sends floats), so the vectors are the upstream's at float32
    assert [d.embedding for d in r.data] == [float32(d.embedding) for d in direct.data]
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8
    (row,) = await meter.rows()
    assert row.prompt_tokens is not None and row.prompt_tokens > 0 and row.completion_tokens == 0
    # both count each input with cl100k_base, so the estimate equals what the simulator billed
    assert row.prompt_tokens == entry["prompt_tokens"]
    assert raw.headers["x-request-id"] == row.request_id
    assert raw.headers["x-meter-usage-source"] == "estimated"
    assert raw.headers["x-meter-cost-usd"] == meter.cost_text(EMBEDDING_MODEL, row.prompt_tokens, 0)
    await _check_row(
        meter,
        row.request_id,
        model=EMBEDDING_MODEL,
        endpoint="embeddings",
        stream=False,
        entry=entry,
        source="estimated",
    )


async def test_stream_cost_comment_before_done(meter: Meter) -> None:
    """Raw SSE ends with `: x-meter-cost-usd=<exact cost>` right before `data: [DONE]`."""
    for path, model, body in (
        ("/chat/completions", CHAT_MODEL, {"messages": MESSAGES}),
        ("/completions", LANGUAGE_MODEL, {"prompt": PROMPT}),
    ):
        status, headers, raw = await post_raw(
            meter.base_url + path, {"model": model, "max_tokens": 7, "stream": True, **body}, meter.auth()
        )
        assert status == 200, raw
        entry = meter.sim.billed.entries[-1]
        cost = meter.cost_text(model, entry["prompt_tokens"], 7)
        assert raw.endswith(b"\n\n: x-meter-cost-usd=" + cost.encode() + b"\n\ndata: [DONE]\n\n")
        assert raw.count(b"x-meter-cost-usd") == 1 and raw.count(b"[DONE]") == 1
        row = await meter.row(headers["x-request-id"])
        assert row.status == "ok" and row.cost_pusd == meter.cost(model, entry["prompt_tokens"], 7)
    assert len(await meter.rows()) == 2
