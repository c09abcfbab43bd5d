"""Streams through the proxy: usage wherever the upstream puts it, the hidden usage chunk,
the operator key upstream, and a client that leaves mid-stream."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from .support import CHAT_MODEL, EMBEDDING_MODEL, LANGUAGE_MODEL, MESSAGES, Meter, StartMeter

# The only headers the proxy may send upstream (the rest are aiohttp's own framing headers).
UPSTREAM_HEADERS = {
    "host",
    "authorization",
    "accept-encoding",
    "content-type",
    "content-length",
    "accept",
    "user-agent",
}


async def _stream_text(meter: Meter, max_tokens: int, **kwargs: Any) -> tuple[str, list[Any]]:
    stream = await meter.openai().chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=max_tokens, stream=True, **kwargs
    )
    chunks = [c async for c in stream]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


@pytest.mark.parametrize("placement", ["finish", "last", "cumulative"])
async def test_upstream_usage_placements(meter: Meter, placement: str) -> None:
    """Usage on the finish chunk, a trailing chunk or every chunk: the row holds the bill."""
    text, _ = await _stream_text(meter, 7, extra_body={"simulate": {"usage": placement}})
    assert text == "Hello from the simulated together upstream."
    (entry,) = meter.sim.billed.entries
    assert entry["completion_tokens"] == 7 and entry["usage_reported"]
    (row,) = await meter.rows()
    assert (row.status, row.usage_source, row.stream_complete) == ("ok", "upstream", True)
    # cumulative usage reports 1, 2, ..., 7: the last value (7), never the sum (28)
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 7)
    assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], 7)


async def test_no_usage_is_estimated(meter: Meter) -> None:
    """A stream without usage gets an estimated row: prompt counted, output from relayed text."""
    text, chunks = await _stream_text(meter, 9, extra_body={"simulate": {"usage": "none"}})
    assert all(c.usage is None for c in chunks)
    (entry,) = meter.sim.billed.entries
    assert not entry["usage_reported"] and entry["completion_tokens"] == 9
    (row,) = await meter.rows()
    assert (row.status, row.usage_source) == ("ok", "estimated")
    assert row.completion_tokens == meter.proxy.relay.tokenizer.count(text) == 9
    assert row.prompt_tokens == entry["prompt_tokens"]
    assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], 9) > 0


async def test_usage_chunk_hidden_when_not_asked(meter: Meter) -> None:
    """Without include_usage the client never sees the usage-only chunk the proxy asked for."""
    text, chunks = await _stream_text(meter, 5, extra_body={"simulate": {"usage": "last"}})
    assert text == "Hello from the simulated together"
    assert len(chunks) == 5 and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    (entry,) = meter.sim.billed.entries
    assert entry["body"]["stream_options"] == {"include_usage": True}
    assert entry["usage_reported"]
    (row,) = await meter.rows()
    assert (row.usage_source, row.prompt_tokens, row.completion_tokens) == (
        "upstream",
        entry["prompt_tokens"],
        5,
    )


async def test_usage_chunk_kept_when_asked(meter: Meter) -> None:
    """A client that set include_usage gets the usage-only chunk, with the billed numbers."""
    _, chunks = await _stream_text(
        meter, 5, stream_options={"include_usage": True}, extra_body={"simulate": {"usage": "last"}}
    )
    (entry,) = meter.sim.billed.entries
    assert len(chunks) == 6 and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (entry["prompt_tokens"], 5)
    assert entry["body"]["stream_options"] == {"include_usage": True}
    (row,) = await meter.rows()
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, 5)


async def test_tenant_key_never_upstream(meter: Meter) -> None:
    """Every upstream request carries the operator key; no header holds a tenant key."""
    acme, globex = meter.openai("acme"), meter.openai("globex")
    await globex.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
    await acme.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"X-Meter-Feature": "chat"}
    )
    await _stream_text(meter, 2)
    await acme.completions.create(model=LANGUAGE_MODEL, prompt="x", max_tokens=2)
    await acme.embeddings.create(model=EMBEDDING_MODEL, input="x")
    assert len(meter.upstream_seen) == 5 and len(meter.sim.billed.entries) == 5
    for seen in meter.upstream_seen:
        headers = seen["headers"]
        assert headers["authorization"] == f"Bearer {meter.operator_key}"
        assert set(headers) <= UPSTREAM_HEADERS, set(headers) - UPSTREAM_HEADERS
        for key in meter.keys.values():
            assert all(key not in v for v in headers.values())
    assert {e["authorization"] for e in meter.sim.billed.entries} == {f"Bearer {meter.operator_key}"}
    assert len(await meter.rows()) == 5


async def _leave_after(meter: Meter, events: int, body: dict[str, Any]) -> str:
    """Read `events` SSE events of a raw stream, then drop the connection; the request id."""
    async with aiohttp.ClientSession() as s:
        r = await s.post(meter.base_url + "/chat/completions", json=body, headers=meter.auth())
        request_id = r.headers["x-request-id"]
        for _ in range(events):
            assert (await r.content.readuntil(b"\n\n")).startswith(b"data: {")
        r.close()  # closes the connection, unread body and all
    return request_id


async def _settled_entry(meter: Meter) -> dict[str, Any]:
    """The single billed entry once the simulator has stopped generating (bounded wait)."""
    (entry,) = meter.sim.billed.entries
    for _ in range(200):
        before = entry["completion_tokens"]
        await asyncio.sleep(0.05)
        if entry["completion_tokens"] == before:
            break
    return entry


async def test_client_abort_records_billed_usage(meter: Meter) -> None:
    """A client that leaves mid-stream: the proxy reads on (grace) and records what was billed."""
    request_id = await _leave_after(
        meter,
        3,
        {
            "model": CHAT_MODEL,
            "messages": MESSAGES,
            "max_tokens": 60,
            "stream": True,
            "simulate": {"chunk_delay_ms": 10},
        },
    )
    (row,) = await meter.wait_terminal(1)
    entry = await _settled_entry(meter)
    assert row.request_id == request_id
    assert entry["completion_tokens"] == 60  # the proxy kept reading after the client left
    assert (row.status, row.usage_source) == ("client_aborted", "upstream")
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 60)
    assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], 60)


async def test_client_abort_past_grace_is_estimated(start_meter: StartMeter) -> None:
    """If the upstream outlasts the grace period, the row is an estimate, flagged, near the bill."""

    def short_grace(config: Any) -> Any:
        return replace(config, upstream=replace(config.upstream, client_abort_grace=0.3))

    async with start_meter(change=short_grace) as meter:
        await _leave_after(
            meter,
            3,
            {
                "model": CHAT_MODEL,
                "messages": MESSAGES,
                "max_tokens": 1000,
                "stream": True,
                "simulate": {"chunk_delay_ms": 10},
            },
        )
        (row,) = await meter.wait_terminal(1)
        entry = await _settled_entry(meter)
        assert 3 <= entry["completion_tokens"] < 1000  # the proxy hung up on the upstream
        assert (row.status, row.usage_source, row.stream_complete) == ("client_aborted", "estimated", False)
        assert row.prompt_tokens == entry["prompt_tokens"]
        assert row.completion_tokens is not None
        # counted from the chunks the proxy received: at most the billed ones, a few short
        assert entry["completion_tokens"] - 3 <= row.completion_tokens <= entry["completion_tokens"]
        assert row.cost_pusd == meter.cost(CHAT_MODEL, row.prompt_tokens, row.completion_tokens)
