"""together's rate-limit headers reach the client unchanged on every answer (JSON, stream, 429),
and the last values per model are exported as gauges."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from .support import CHAT_MODEL, MESSAGES, Meter, StartMeter, post_raw

LIMITS = {
    "x-ratelimit-limit": "600",
    "x-ratelimit-remaining": "598",
    "x-ratelimit-reset": "0.75",
    "x-tokenlimit-limit": "180000",
    "x-tokenlimit-remaining": "179000",
}
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
LIMITED = {
    "error": {
        "message": "You have been rate limited",
        "type": "dynamic_request_limited",
        "param": None,
        "code": None,
    }
}


async def chat(request: web.Request) -> web.StreamResponse:
    """A together-like upstream: a JSON answer, an SSE stream, or a 429, each with limits."""
    body = await request.json()
    if body.get("max_tokens") == 99:
        headers = {"retry-after": "2", "retry-after-ms": "1500", "x-should-retry": "true", **LIMITS}
        return web.json_response(LIMITED, status=429, headers=headers)
    answer = {"id": "r1", "object": "chat.completion", "model": CHAT_MODEL, "choices": [], "usage": USAGE}
    if not body.get("stream"):
        return web.json_response(answer, headers=LIMITS)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **LIMITS})
    await resp.prepare(request)
    chunk = {"id": "r1", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    await resp.write(b"data: " + orjson.dumps({**chunk, "usage": USAGE}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture
async def limited(start_meter: StartMeter) -> AsyncIterator[Meter]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with start_meter(upstream=f"http://127.0.0.1:{port}/v1") as meter:
            yield meter
    finally:
        await runner.cleanup()


@pytest.mark.sqlite_only
async def test_rate_limit_headers_pass_through_and_become_gauges(limited: Meter) -> None:
    """JSON answers, streams and 429s carry the upstream's rate-limit headers as sent; the
    gauges show the last values per model."""
    url = f"{limited.base_url}/chat/completions"
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 3}
    for extra in ({}, {"stream": True}):
        status, headers, _ = await post_raw(url, {**body, **extra}, limited.auth())
        assert status == 200 and {k: headers[k] for k in LIMITS} == LIMITS, extra
    status, headers, data = await post_raw(url, {**body, "max_tokens": 99}, limited.auth())
    assert status == 429 and orjson.loads(data) == LIMITED
    assert (headers["retry-after"], headers["retry-after-ms"], headers["x-should-retry"]) == (
        "2",
        "1500",
        "true",
    )
    gauges = (await limited.metric_samples())["together_meter_upstream_rate_limit"]
    got = {dict(k)["kind"]: v for k, v in gauges.items() if dict(k)["model"] == CHAT_MODEL}
    assert got == {
        "request_limit": 600,
        "request_remaining": 598,
        "request_reset_seconds": 0.75,
        "token_limit": 180000,
        "token_remaining": 179000,
    }
