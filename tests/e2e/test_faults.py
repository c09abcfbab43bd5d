"""Faults (issue 7, points 1 and 2): clients that leave early and upstreams that fail, through the
real proxy, the real simulator and the TCP fault relay (tests/faultrelay.py) between them.

Every scenario checks the ledger: exactly one row per request, its status, usage_source, tokens
and cost, against what the client received and what the simulator billed. Timeouts are short:
first byte 1 s, idle 0.5 s, total 3 s, client abort grace 1 s. Scenarios whose outcome does not
depend on the ledger backend run on SQLite only (`sqlite_only`); the rest run on both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
from faultrelay import FaultRelay

from proxy.ledger import LedgerRow
from proxy.server.admin import WATCH_KEY

from .support import CHAT_MODEL, MESSAGES, Meter, StartMeter, error_of

FIRST_BYTE, IDLE, TOTAL, GRACE = 1.0, 0.5, 3.0, 1.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)


def _fast(config: Any) -> Any:
    up = replace(
        config.upstream,
        first_byte_timeout=FIRST_BYTE,
        idle_timeout=IDLE,
        total_timeout=TOTAL,
        client_abort_grace=GRACE,
    )
    return replace(config, upstream=up)


@pytest.fixture
async def fast(start_meter: StartMeter) -> AsyncIterator[Meter]:
    """A meter with the short timeouts, talking to the simulator directly."""
    async with start_meter(change=_fast) as m:
        yield m


@pytest.fixture
async def relayed(start_meter: StartMeter) -> AsyncIterator[tuple[Meter, FaultRelay]]:
    """A meter with the short timeouts whose upstream is the simulator behind a fault relay."""
    relay = await FaultRelay.start("127.0.0.1", 0)
    try:
        async with start_meter(upstream=relay.url("/v1"), change=_fast) as m:
            relay.target = ("127.0.0.1", m.sim.port)  # the simulator exists now; nothing connected yet
            await _probed(m)  # the start-up connect probe of /readyz (no bytes) has been through the relay
            yield m, relay
    finally:
        await relay.close()


async def _probed(meter: Meter) -> None:
    """Wait (bounded) until the admin listener's start-up probe of the upstream has ended."""
    watch = meter.proxy.admin_app[WATCH_KEY]
    deadline = time.monotonic() + 5
    while watch.connectable is None:
        assert time.monotonic() < deadline, "no start-up probe of the upstream within 5 s"
        await asyncio.sleep(0.01)


def _chat(max_tokens: int, stream: bool, **simulate: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    if simulate:
        body["simulate"] = simulate
    return body


async def _call(meter: Meter, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """POST a chat body; status, request id, and every body byte until the proxy closed it."""
    data = b""
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as s,
        s.post(meter.base_url + "/chat/completions", json=body, headers=meter.auth()) as r,
    ):
        try:
            async for chunk in r.content.iter_any():
                data += chunk
        except aiohttp.ClientPayloadError:
            pass  # the proxy closed a chunked body early: what arrived is what counts
        return r.status, r.headers["x-request-id"], data


def _events(data: bytes) -> list[Any]:
    """The JSON payloads of the `data:` events of an SSE body (`[DONE]` as the string)."""
    out: list[Any] = []
    for block in data.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:]
                out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def _content_chunks(events: list[Any]) -> int:
    """Chunks with generated text (the simulator sends one token per chunk)."""
    return sum(
        1
        for e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")
    )


async def _only_row(meter: Meter, request_id: str) -> LedgerRow:
    """Exactly one row in the ledger, terminal, for this request."""
    (row,) = await meter.wait_terminal(1)
    assert row.request_id == request_id
    assert len(await meter.rows()) == 1
    return row


async def _settled(meter: Meter) -> dict[str, Any]:
    """The single billed entry once the simulator stopped generating (bounded wait)."""
    (entry,) = meter.sim.billed.entries
    for _ in range(100):
        before = entry["completion_tokens"]
        await asyncio.sleep(0.05)
        if entry["completion_tokens"] == before:
            break
    return entry


def _assert_estimated_stream(meter: Meter, row: LedgerRow, status: str, received: int) -> None:
    """An incomplete stream's row: its status, an estimate flagged as such, >= what was relayed."""
    assert (row.status, row.usage_source, row.stream_complete) == (status, "estimated", False)
    assert row.prompt_tokens is not None and row.completion_tokens is not None
    assert row.completion_tokens >= received
    assert row.cost_pusd == meter.cost(CHAT_MODEL, row.prompt_tokens, row.completion_tokens) > 0


# -- the relay itself is transparent -----------------------------------------------------------


@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_rechunked_upstream_gives_identical_rows(relayed: tuple[Meter, FaultRelay]) -> None:
    """1-byte upstream writes: the same answers, rows and costs as in pass mode."""
    meter, relay = relayed
    bodies = [_chat(7, False), _chat(7, True), _chat(5, True, usage="last")]
    answers = []
    for mode in ("pass", "rechunk"):
        if mode == "rechunk":
            relay.rechunk()
        for body in bodies:
            status, _, data = await _call(meter, body)
            assert status == 200
            answers.append(
                data if not body.get("stream") else [_events(data)[i]["choices"] for i in range(3)]
            )
    rows = await meter.wait_terminal(6)
    assert relay.bytes_down > 0 and len(meter.sim.billed.entries) == 6
    view = [(r.status, r.usage_source, r.prompt_tokens, r.completion_tokens, r.cost_pusd) for r in rows]
    assert view[:3] == view[3:]
    for row, entry in zip(rows, meter.sim.billed.entries, strict=True):
        assert (row.status, row.usage_source) == ("ok", "upstream")
        assert (row.prompt_tokens, row.completion_tokens) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        )
        assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], entry["completion_tokens"])
    assert orjson.loads(answers[0])["choices"] == orjson.loads(answers[3])["choices"]
    assert answers[1:3] == answers[4:6]


# -- upstream faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
async def test_cut_stream_is_upstream_aborted(relayed: tuple[Meter, FaultRelay], rst: bool) -> None:
    """A stream cut mid-body (FIN or RST): an error event, never [DONE]; row upstream_aborted,
    estimated, at least the tokens the client received."""
    meter, relay = relayed
    relay.cut_after(2500, rst=rst)  # the headers and a few chunks of about 300 bytes
    status, request_id, data = await _call(meter, _chat(40, True, chunk_delay_ms=5))
    assert status == 200 and b"[DONE]" not in data
    events = _events(data)
    received = _content_chunks(events)
    assert 1 <= received < 40
    assert events[-1]["error"]["code"] == "upstream_protocol_error"
    row = await _only_row(meter, request_id)
    _assert_estimated_stream(meter, row, "upstream_aborted", received)
    entry = await _settled(meter)
    assert row.prompt_tokens == entry["prompt_tokens"]
    assert received <= row.completion_tokens <= entry["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_stall_before_headers_is_504_at_first_byte(
    relayed: tuple[Meter, FaultRelay], stream: bool
) -> None:
    """An upstream that accepts and says nothing: 504 at the first-byte timeout, one attempt,
    row upstream_timeout charged at its reservation (estimated)."""
    meter, relay = relayed
    relay.stall()
    probes = relay.accepted  # the start-up connect probe of /readyz, which sends nothing
    t0 = time.monotonic()
    status, request_id, data = await _call(meter, _chat(5, stream))
    elapsed = time.monotonic() - t0
    assert status == 504 and FIRST_BYTE <= elapsed < 3 * FIRST_BYTE
    assert error_of(data)["code"] == "upstream_timeout"
    assert relay.accepted - probes == 1  # exactly one upstream attempt, no retry
    row = await _only_row(meter, request_id)
    assert (row.status, row.usage_source, row.error_code) == (
        "upstream_timeout",
        "estimated",
        "upstream_timeout",
    )
    assert row.cost_pusd == row.reserved_pusd is not None and row.cost_pusd > 0
    relay.drop_all()  # the held request never reaches the simulator
    relay.passthrough()
    assert meter.sim.billed.entries == []


async def test_stall_mid_stream_is_bounded_by_idle(relayed: tuple[Meter, FaultRelay]) -> None:
    """A stream whose upstream goes silent: ended by the idle timeout with an error event,
    never [DONE]; row upstream_timeout, estimated, >= what the client received."""
    meter, relay = relayed
    body = _chat(40, True, chunk_delay_ms=20)
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as s,
        s.post(meter.base_url + "/chat/completions", json=body, headers=meter.auth()) as r,
    ):
        first = [await r.content.readuntil(b"\n\n") for _ in range(3)]
        relay.stall()
        t0 = time.monotonic()
        rest = await r.content.read()
        elapsed = time.monotonic() - t0
        request_id = r.headers["x-request-id"]
    data = b"".join(first) + rest
    events = _events(data)
    assert b"[DONE]" not in data and events[-1]["error"]["code"] == "upstream_timeout"
    assert elapsed < 3 * IDLE
    row = await _only_row(meter, request_id)
    _assert_estimated_stream(meter, row, "upstream_timeout", _content_chunks(events))
    relay.drop_all()


@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_slow_first_chunk_is_bounded_by_idle(fast: Meter) -> None:
    """Stream headers, then silence longer than the idle timeout before the first chunk: the
    stream ends at the idle timeout (not when the upstream wakes up), row upstream_timeout."""
    t0 = time.monotonic()
    status, request_id, data = await _call(fast, _chat(8, True, delay_ms=1200))
    elapsed = time.monotonic() - t0
    assert status == 200 and b"[DONE]" not in data
    assert [e["error"]["code"] for e in _events(data)] == ["upstream_timeout"]
    assert IDLE <= elapsed < 3 * IDLE
    row = await _only_row(fast, request_id)
    _assert_estimated_stream(fast, row, "upstream_timeout", 0)
    assert row.completion_tokens == 0


@pytest.mark.parametrize(
    ("trickle_ms", "bound"), [(800, IDLE), (10, TOTAL)], ids=["slower_than_idle", "past_total"]
)
@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_trickling_stream_is_bounded(fast: Meter, trickle_ms: int, bound: float) -> None:
    """One byte per 800 ms ends at the idle timeout; one per 10 ms at the total deadline;
    either way an error event, never [DONE], and an upstream_timeout row."""
    t0 = time.monotonic()
    status, request_id, data = await _call(fast, _chat(40, True, trickle_ms=trickle_ms))
    elapsed = time.monotonic() - t0
    assert status == 200 and b"[DONE]" not in data
    assert _events(data)[-1]["error"]["code"] == "upstream_timeout"
    assert bound <= elapsed < bound + 2 * IDLE + 1.0
    row = await _only_row(fast, request_id)
    _assert_estimated_stream(fast, row, "upstream_timeout", _content_chunks(_events(data)))


@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_trickling_body_is_504(fast: Meter) -> None:
    """A non-streaming body arriving one byte per 100 ms: 504 once the idle timeout passes,
    row upstream_timeout charged at its reservation."""
    t0 = time.monotonic()
    status, request_id, data = await _call(fast, _chat(5, False, trickle_ms=100))
    elapsed = time.monotonic() - t0
    assert status == 504 and IDLE <= elapsed < 3 * IDLE + 1.0
    assert error_of(data)["code"] == "upstream_timeout"
    row = await _only_row(fast, request_id)
    assert (row.status, row.usage_source) == ("upstream_timeout", "estimated")
    assert row.cost_pusd == row.reserved_pusd


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_5xx_before_body_is_one_attempt(fast: Meter, status: int, stream: bool) -> None:
    """An upstream 5xx is passed through after exactly one attempt (no retry), with Retry-After
    when the upstream sent one; one upstream_error row at cost 0."""
    status_got, headers_retry, request_id = 0, None, ""
    body = _chat(5, stream, status=status, retry_after=7)
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as s,
        s.post(fast.base_url + "/chat/completions", json=body, headers=fast.auth()) as r,
    ):
        status_got, headers_retry, request_id = (
            r.status,
            r.headers.get("Retry-After"),
            r.headers["x-request-id"],
        )
        assert error_of(await r.read())["message"] == "simulated error"
    assert status_got == status
    assert headers_retry == ("7" if status == 503 else None)
    assert len(fast.upstream_seen) == 1 and fast.sim.billed.entries == []
    row = await _only_row(fast, request_id)
    assert (row.status, row.upstream_status, row.usage_source, row.cost_pusd) == (
        "upstream_error",
        status,
        "none",
        0,
    )


async def test_unreachable_upstream_degrades_readiness(relayed: tuple[Meter, FaultRelay]) -> None:
    """A refused upstream: 502s with cost-0 rows, /readyz 503 with a reason, and 200 again once
    the upstream listens (probed by /readyz itself, without client traffic)."""
    meter, relay = relayed
    assert (await _call(meter, _chat(3, False)))[0] == 200
    assert (await meter.admin_get("/readyz"))[0] == 200
    relay.refuse(hard=True)
    relay.drop_all()  # pooled keep-alive connections go too
    for i in range(3):
        status, _, data = await _call(meter, _chat(3, i % 2 == 1))
        assert status == 502 and error_of(data)["code"] == "upstream_unreachable"
    status, body = await meter.admin_get("/readyz")
    ready = orjson.loads(body)
    assert status == 503 and ready["upstream_reachable"] is False and ready["ready"] is False
    assert "upstream" in ready["reason"]
    assert (await meter.admin_get("/readyz"))[0] == 503  # the probe fails too: still down
    relay.passthrough()
    await relay.reopened()
    status, body = await meter.admin_get("/readyz")
    assert (status, orjson.loads(body)["upstream_reachable"]) == (200, True)
    assert (await _call(meter, _chat(3, True)))[0] == 200
    rows = await meter.wait_terminal(5)
    assert [(r.status, r.cost_pusd, r.usage_source) for r in rows[1:4]] == [("upstream_error", 0, "none")] * 3
    assert [r.status for r in (rows[0], rows[4])] == ["ok", "ok"]
    assert len(meter.sim.billed.entries) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("mode", ["negative", "string", "huge"])
@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_malformed_usage_is_estimated(fast: Meter, mode: str, stream: bool) -> None:
    """Negative, string or absurd usage is never priced: an estimate, flagged, equal to the
    simulator's bill here (one token per word), never negative, never above the reservation."""
    status, request_id, _ = await _call(fast, _chat(6, stream, malformed_usage=mode))
    assert status == 200
    row = await _only_row(fast, request_id)
    (entry,) = fast.sim.billed.entries
    assert (row.status, row.usage_source, row.error_code) == ("ok", "estimated", None)
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 6)
    assert row.reserved_pusd is not None
    assert 0 < row.cost_pusd == fast.cost(CHAT_MODEL, entry["prompt_tokens"], 6) <= row.reserved_pusd


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.sqlite_only  # the fault is on the upstream hop: one ledger backend is enough
async def test_unparseable_usage_is_estimated_from_size(fast: Meter, stream: bool) -> None:
    """A body (or the chunk with the usage) that is not JSON: estimated, counting the unreadable
    bytes, so never below the 6 tokens billed, and never above the reservation."""
    status, request_id, data = await _call(fast, _chat(6, stream, malformed_json=True))
    assert status == 200 and (b"[DONE]" in data) is stream
    row = await _only_row(fast, request_id)
    (entry,) = fast.sim.billed.entries
    assert (row.status, row.usage_source, row.prompt_tokens) == ("ok", "estimated", entry["prompt_tokens"])
    assert row.completion_tokens is not None and row.reserved_pusd is not None
    assert 6 <= row.completion_tokens <= (len(data) + 3) // 4
    assert 0 < row.cost_pusd == fast.cost(CHAT_MODEL, entry["prompt_tokens"], row.completion_tokens)
    assert row.cost_pusd <= row.reserved_pusd


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_usage_above_the_reservation_is_capped(fast: Meter, stream: bool) -> None:
    """A well-formed usage costing more than the request's upper bound (40M prompt tokens for a
    tiny request) is charged the reservation, flagged estimated / usage_out_of_bounds."""
    status, request_id, _ = await _call(fast, _chat(6, stream, malformed_usage="inflated"))
    assert status == 200
    row = await _only_row(fast, request_id)
    assert (row.status, row.usage_source, row.error_code) == ("ok", "estimated", "usage_out_of_bounds")
    assert row.reserved_pusd is not None
    assert row.cost_pusd == row.reserved_pusd < fast.cost(CHAT_MODEL, 40_000_000, 10_000_000)
    assert (row.prompt_tokens, row.completion_tokens) == (None, None)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_real_usage_above_the_reservation_is_billed_as_reported(
    start_meter: StartMeter, stream: bool
) -> None:
    """Without max_tokens the reservation assumes the output cap; a longer answer (1000 tokens
    against a cap of 8, within the context window) is billed exactly as the upstream reported."""

    def small_cap(config: Any) -> Any:
        return replace(_fast(config), budgets=replace(config.budgets, default_max_output_tokens=8))

    async with start_meter(change=small_cap) as m:
        body = _chat(1, stream, completion_tokens=1000)
        del body["max_tokens"]
        status, request_id, _ = await _call(m, body)
        assert status == 200
        row = await _only_row(m, request_id)
        (billed,) = m.sim.billed.entries
        assert (row.status, row.usage_source, row.error_code) == ("ok", "upstream", None)
        assert (row.prompt_tokens, row.completion_tokens) == (billed["prompt_tokens"], 1000)
        assert row.cost_pusd == m.cost(CHAT_MODEL, billed["prompt_tokens"], 1000)
        assert row.reserved_pusd is not None and row.cost_pusd > row.reserved_pusd


# -- clients that leave ------------------------------------------------------------------------


async def _leave_after(meter: Meter, body: dict[str, Any], *, events: int = 0, after_s: float = 0.0) -> str:
    """Send `body`, read `events` SSE events or wait `after_s`, then drop the connection."""
    session = aiohttp.ClientSession(timeout=CLIENT_TIMEOUT)
    try:
        if events:
            r = await session.post(meter.base_url + "/chat/completions", json=body, headers=meter.auth())
            for _ in range(events):
                assert (await r.content.readuntil(b"\n\n")).startswith(b"data: {")
            request_id = r.headers["x-request-id"]
            r.close()
            return request_id
        task = asyncio.ensure_future(
            session.post(meter.base_url + "/chat/completions", json=body, headers=meter.auth())
        )
        await asyncio.sleep(after_s)
        assert not task.done()  # no answer yet: the client leaves before the first byte
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return ""
    finally:
        await session.close()


async def test_client_leaves_before_upstream_headers(relayed: tuple[Meter, FaultRelay]) -> None:
    """A stream client leaving before the upstream answered: one client_aborted row with the
    usage the upstream billed once it answered."""
    meter, relay = relayed
    relay.stall()
    await _leave_after(meter, _chat(8, True), after_s=0.3)
    relay.passthrough()  # the upstream answers within the first-byte timeout, to nobody
    (row,) = await meter.wait_terminal(1)
    entry = await _settled(meter)
    assert (row.status, row.usage_source) == ("client_aborted", "upstream")
    assert (
        (row.prompt_tokens, row.completion_tokens)
        == (entry["prompt_tokens"], entry["completion_tokens"])
        == (
            entry["prompt_tokens"],
            8,
        )
    )
    assert row.cost_pusd == meter.cost(CHAT_MODEL, entry["prompt_tokens"], 8)
    assert len(await meter.rows()) == 1


async def test_client_leaves_before_first_chunk(fast: Meter) -> None:
    """A stream client leaving after the headers, before any chunk: client_aborted, billed usage."""
    request_id = ""
    session = aiohttp.ClientSession(timeout=CLIENT_TIMEOUT)
    try:
        r = await session.post(
            fast.base_url + "/chat/completions", json=_chat(8, True, delay_ms=300), headers=fast.auth()
        )
        request_id = r.headers["x-request-id"]
        r.close()
    finally:
        await session.close()
    row = await _only_row(fast, request_id)
    entry = await _settled(fast)
    assert (row.status, row.usage_source) == ("client_aborted", "upstream")
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 8)
    assert row.cost_pusd == fast.cost(CHAT_MODEL, entry["prompt_tokens"], 8)


async def test_client_leaves_before_the_usage_chunk(fast: Meter) -> None:
    """The free-ride attempt: leaving after the last content chunk, before the usage chunk;
    the row still carries the full upstream usage."""
    request_id = await _leave_after(fast, _chat(5, True, usage="last", usage_delay_ms=300), events=5)
    row = await _only_row(fast, request_id)
    (entry,) = fast.sim.billed.entries
    assert entry["usage_reported"]
    assert row.status in ("client_aborted", "ok") and row.usage_source == "upstream"
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 5)
    assert row.cost_pusd == fast.cost(CHAT_MODEL, entry["prompt_tokens"], 5)


async def test_client_leaves_during_non_streaming_call(fast: Meter) -> None:
    """A non-streaming client leaving while the upstream works: one client_aborted row with
    the upstream's usage."""
    await _leave_after(fast, _chat(9, False, delay_ms=600), after_s=0.2)
    (row,) = await fast.wait_terminal(1)
    (entry,) = fast.sim.billed.entries
    assert (row.status, row.usage_source) == ("client_aborted", "upstream")
    assert (row.prompt_tokens, row.completion_tokens) == (entry["prompt_tokens"], 9)
    assert row.cost_pusd == fast.cost(CHAT_MODEL, entry["prompt_tokens"], 9)
    assert len(await fast.rows()) == 1
