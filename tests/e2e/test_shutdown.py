"""SIGTERM drains the real proxy subprocess (issue 7, scenario 4).

With limits.drain_timeout = 2 s: /readyz answers 503 at once, the public port refuses new
connections, streams that end within the drain finish with `[DONE]` and `ok` rows, streams
longer than the drain end with an SSE error event (code `shutdown`, no `[DONE]`) and a
`shutdown_aborted` row, and the process exits 0 soon after the drain.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy import simulator

from .procs import Outcome, ProxyProcess, integrity, ledger_rows, stream_chat, write_config

DRAIN_S = 2.0
CHUNK_DELAY_MS = 50.0
SHORT_TOKENS = 16  # about 0.8 s: ends within the drain
LONG_TOKENS = 200  # about 10 s: outlives the drain


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[tuple[ProxyProcess, str]]:
    sim = await simulator.start()
    config, key = write_config(tmp_path, drain_timeout=DRAIN_S)
    p = ProxyProcess(config, tmp_path / "ledger.db", sim.url, tmp_path / "proxy.log")
    try:
        yield p, key
    finally:
        await p.kill()
        await sim.stop()


async def first_503(p: ProxyProcess, within: float) -> float:
    """Seconds until /readyz answers 503 (polled, bounded)."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t0 < within:
            async with s.get(p.admin + "/readyz") as r:
                if r.status == 503:
                    assert (await r.json())["accepting"] is False
                    return time.monotonic() - t0
            await asyncio.sleep(0.01)
    raise AssertionError(f"/readyz still 200 after {within} s")


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


async def test_sigterm_drains_short_streams_and_cuts_long_ones_cleanly(
    proc: tuple[ProxyProcess, str],
) -> None:
    """SIGTERM: 503 at once, refused, short streams ok, long ones shutdown_aborted, exit 0."""
    p, key = proc
    await p.start()
    short = [Outcome(completion_tokens=SHORT_TOKENS) for _ in range(3)]
    long = [Outcome(completion_tokens=LONG_TOKENS) for _ in range(3)]
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(stream_chat(session, p.url, key, o, CHUNK_DELAY_MS)) for o in short + long
        ]
        try:
            for _ in range(1000):  # at most 10 s until every stream is under way
                if all(o.body for o in short + long):
                    break
                await asyncio.sleep(0.01)
            assert all(o.body for o in short + long), "the streams did not start"
            t0 = time.monotonic()
            p.signal(signal.SIGTERM)
            assert await first_503(p, within=1.0) < 1.0
            refused_after = None
            while time.monotonic() - t0 < 1.0:
                if refuses(p.port):
                    refused_after = time.monotonic() - t0
                    break
                await asyncio.sleep(0.01)
            assert refused_after is not None, "the public port still accepts after 1 s"
            code = await p.wait(DRAIN_S + 4)
            exited_after = time.monotonic() - t0
            async with asyncio.timeout(5):
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    assert code == 0, p.tail()
    assert DRAIN_S <= exited_after < DRAIN_S + 3
    assert integrity(p.ledger) == "ok"
    rows = ledger_rows(p.ledger)
    assert len(rows) == 6 and [r for r in rows.values() if r["status"] == "in_flight"] == []
    for o in short:
        assert o.done and o.error is None, o
        row = rows[o.request_id or ""]
        assert (row["status"], row["stream_complete"], row["usage_source"]) == ("ok", 1, "upstream")
        assert row["completion_tokens"] == SHORT_TOKENS
    for o in long:
        assert not o.done, "a stream cut by shutdown must not end with [DONE]"
        assert b"[DONE]" not in o.body
        last = orjson.loads(o.events[-1])
        assert last["error"]["code"] == "shutdown" and last["error"]["type"] == "server_error"
        content = [e for e in o.events[:-1] if b'"choices"' in e]
        assert 0 < len(content) < LONG_TOKENS
        row = rows[o.request_id or ""]
        assert (row["status"], row["stream_complete"], row["usage_source"]) == (
            "shutdown_aborted",
            0,
            "estimated",
        )
        # usage seen or estimated (at least the words the client got), never above the reservation
        assert row["completion_tokens"] >= len(content) // 2 > 0
        assert 0 < row["cost_pusd"] <= row["reserved_pusd"]
