"""Slow request heads (issue 7, point 5): a client sending its request line and headers one byte
at a time, or nothing at all, is closed at `limits.header_timeout` on both listeners, with no
answer and no ledger row, while other clients are served; idle keep-alive time and slow
responses are not cut by it. Malformed heads get a 400, a count and one quiet log line."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from .support import CHAT_MODEL, MESSAGES, Meter, StartMeter

# the deadline is the listener's, before any ledger work: one ledger backend is enough
pytestmark = pytest.mark.sqlite_only
HEADER_TIMEOUT = 1.0
CUT_WITHIN = 2 * HEADER_TIMEOUT  # generous: the timer fires at 1 s
TRICKLE_S = 0.2
ANSWER = "Hello from the simulated together"  # the simulator's text for 5 tokens


@pytest.fixture
async def guarded(start_meter: StartMeter) -> AsyncIterator[Meter]:
    """A meter with a 1 s header deadline."""

    def change(config: Any) -> Any:
        return replace(config, limits=replace(config.limits, header_timeout=HEADER_TIMEOUT))

    async with start_meter(change=change) as m:
        yield m


def _chat(meter: Meter, **fields: Any) -> bytes:
    body = orjson.dumps({"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 5, **fields})
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {meter.keys['acme']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _trickle(port: int, data: bytes, *, start_after: bytes = b"") -> tuple[float, bytes]:
    """Send `start_after` at once, then `data` one byte per 200 ms until the server closes:
    (seconds from the first trickled byte to the close, what the server sent after `start_after`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if start_after:
            writer.write(start_after)
            await _read_response(reader)
        t0 = time.monotonic()
        closed = asyncio.create_task(reader.read(65536))
        for i in range(len(data)):  # bounded by the head length; the close ends it far sooner
            if closed.done():
                break
            writer.write(data[i : i + 1])
            await asyncio.wait([closed], timeout=TRICKLE_S)
        async with asyncio.timeout(5):
            answer = await closed
        return time.monotonic() - t0, answer
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from a kept-alive connection."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def test_trickled_heads_cut_while_sdk_clients_served(guarded: Meter) -> None:
    """Three connections trickling a request head and one sending nothing are closed within 2 s
    of a 1 s header_timeout, unanswered; meanwhile 8 openai-SDK calls get the right answer, and
    the ledger holds exactly those 8 rows."""
    head = _chat(guarded).partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    slow = [asyncio.create_task(_trickle(guarded.proxy.port, head)) for _ in range(3)]
    silent = asyncio.create_task(_trickle(guarded.proxy.port, b""))
    client = guarded.openai()
    answers = []
    for i in range(8):  # spread over ~1.6 s: the slow heads are being cut meanwhile
        r = await client.chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=5, stream=i % 2 == 1
        )
        if i % 2:
            answers.append("".join([c.choices[0].delta.content or "" async for c in r if c.choices]))
        else:
            answers.append(r.choices[0].message.content)
        await asyncio.sleep(0.2)
    assert answers == [ANSWER] * 8
    for elapsed, answer in await asyncio.gather(*slow):
        assert answer == b""
        assert HEADER_TIMEOUT * 0.9 < elapsed < CUT_WITHIN
    silent_elapsed, silent_answer = await silent
    assert silent_answer == b"" and silent_elapsed < CUT_WITHIN
    rows = await guarded.wait_terminal(8)
    assert [r.status for r in rows] == ["ok"] * 8
    assert len(guarded.upstream_seen) == 8
    samples = await guarded.metric_samples()
    assert samples["together_meter_header_timeouts_total"] == {(("listener", "public"),): 4.0}


async def test_admin_listener_has_the_deadline(guarded: Meter) -> None:
    """A head trickled to the admin port is closed within 2 s; /healthz is answered meanwhile."""
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n"
    slow = asyncio.create_task(_trickle(guarded.proxy.admin_port, head))
    await asyncio.sleep(0.3)
    status, _ = await guarded.admin_get("/healthz")
    assert status == 200
    elapsed, answer = await slow
    assert answer == b"" and HEADER_TIMEOUT * 0.9 < elapsed < CUT_WITHIN
    samples = await guarded.metric_samples()
    assert samples["together_meter_header_timeouts_total"] == {(("listener", "admin"),): 1.0}


async def test_keep_alive_idle_and_slow_responses_not_cut(guarded: Meter) -> None:
    """On one kept-alive connection: a 1.5 s response, 2.5 s idle, a 1.5 s stream, then another
    request all succeed (the deadline covers heads only); a trickled head on it is then cut."""
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.proxy.port)
    try:
        writer.write(_chat(guarded, simulate={"delay_ms": 1500}))
        status, body = await _read_response(reader)
        assert status == 200 and orjson.loads(body)["choices"][0]["message"]["content"] == ANSWER
        await asyncio.sleep(2.5 * HEADER_TIMEOUT)
        writer.write(_chat(guarded, stream=True, simulate={"chunk_delay_ms": 300}))
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
            stream = b""
            while not stream.endswith(b"0\r\n\r\n"):  # chunked transfer ends with a 0-size chunk
                stream += await reader.read(65536)
        assert stream.count(b"data: ") >= 5 + 1 and b"data: [DONE]" in stream
        writer.write(_chat(guarded))
        status, body = await _read_response(reader)
        assert status == 200
    finally:
        writer.close()
    rows = await guarded.wait_terminal(3)
    assert [r.status for r in rows] == ["ok"] * 3
    # the same again, then the next head trickled: cut, no fourth row
    elapsed, answer = await _trickle(
        guarded.proxy.port, _chat(guarded).partition(b"\r\n\r\n")[0], start_after=_chat(guarded)
    )
    assert answer == b"" and HEADER_TIMEOUT * 0.9 < elapsed < CUT_WITHIN
    rows = await guarded.wait_terminal(4)
    assert [r.status for r in rows] == ["ok"] * 4
    samples = await guarded.metric_samples()
    assert samples["together_meter_header_timeouts_total"] == {(("listener", "public"),): 1.0}


async def _send_raw(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_malformed_heads_get_400_a_count_and_one_quiet_log_line(
    guarded: Meter, caplog: pytest.LogCaptureFixture
) -> None:
    """20 malformed request heads (a garbage line, a bad header line after a real key, a line
    over 8 KB, a non-numeric Content-Length) each get a 400 on their connection and are counted;
    the log holds one WARNING line naming the kind of error, no aiohttp ERROR with a traceback
    per connection (a flood), and never the key; an SDK call is served afterwards, with no row
    for the 20."""
    caplog.set_level(logging.INFO, logger="aiohttp")
    caplog.set_level(logging.WARNING, logger="proxy.server.serving")
    key = guarded.keys["acme"]
    heads = [
        b"GARBAGE\r\n\r\n",
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nbad header\r\n\r\n".encode(),
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ] * 5
    answers = [await _send_raw(guarded.proxy.port, head) for head in heads]
    assert [a.split(b" ", 2)[1] for a in answers] == [b"400"] * 20
    r = await guarded.openai().chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=5)
    assert r.choices[0].message.content == ANSWER
    assert len(await guarded.wait_terminal(1)) == 1
    samples = await guarded.metric_samples()
    assert samples["together_meter_malformed_requests_total"] == {(("listener", "public"),): 20.0}
    ours = [rec for rec in caplog.records if rec.name == "proxy.server.serving"]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING
    assert "malformed request from 127.0.0.1 answered 400" in ours[0].getMessage()
    assert not [
        rec for rec in caplog.records if rec.name.startswith("aiohttp") and rec.levelno >= logging.ERROR
    ]
    assert key not in caplog.text
