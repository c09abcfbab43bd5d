"""/readyz and the upstream: a TCP connect probe at start and every PROBE_EVERY seconds, so an
unreachable upstream shows before any request has failed, and nothing is sent or billed for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import pytest

from proxy.server import admin
from tests.faultrelay import FaultRelay

from .support import StartMeter, closed_port

WAIT_S = 10.0


async def _until(condition: Callable[[], bool]) -> None:
    """Poll (bounded) until `condition()` holds."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not true within {WAIT_S} s"
        await asyncio.sleep(0.02)


@pytest.mark.sqlite_only  # the upstream is what is probed: one ledger backend is enough
async def test_refusing_upstream_is_not_ready_before_any_request(start_meter: StartMeter) -> None:
    """An upstream nobody listens on: /readyz is 503 naming the upstream although no request has
    been sent, failed or recorded."""
    async with start_meter(upstream=f"http://127.0.0.1:{closed_port()}/v1") as meter:
        status, body = await meter.admin_get("/readyz")
        ready = orjson.loads(body)
        assert (status, ready["ready"], ready["upstream_reachable"]) == (503, False, False)
        assert ready["reason"] == "the upstream cannot be reached"
        assert await meter.rows() == [] and meter.proxy.upstream.failed_attempts == 0


@pytest.mark.sqlite_only
async def test_the_probe_follows_the_upstream_without_traffic(
    start_meter: StartMeter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probed at start and then periodically, without traffic or /readyz calls: refused at start,
    reachable once it listens, unreachable when it stops; a probe sends no byte and bills nothing."""
    monkeypatch.setattr(admin, "PROBE_EVERY", 0.05)
    relay = await FaultRelay.start("127.0.0.1", 0)
    relay.refuse(hard=True)
    try:
        async with start_meter(upstream=relay.url("/v1")) as meter:
            relay.target = ("127.0.0.1", meter.sim.port)
            watch = meter.proxy.admin_app[admin.WATCH_KEY]
            await _until(lambda: watch.connectable is False)  # the start-up probe
            relay.passthrough()
            await _until(lambda: watch.connectable is True)
            assert (await meter.admin_get("/readyz"))[0] == 200
            relay.refuse(hard=True)
            await _until(lambda: watch.connectable is False)
            assert (await meter.admin_get("/readyz"))[0] == 503
            assert relay.accepted > 0 and bytes(relay.received) == b""
            assert meter.sim.billed.entries == [] and await meter.rows() == []
    finally:
        await relay.close()
