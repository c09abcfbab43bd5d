"""The public API keeps answering while the biggest reports run (issue 16, point 2).

200,000 rows of the current month go into the proxy's own ledger; then /admin/report (every
grouping), /admin/chargeback and /admin/tenants/{t}/usage run over and over while a sequential
probe of small chat requests goes through the proxy. Reports read the rollups, summed in the
database (SQLite: in a worker thread), so no request waits behind them. The bound asserted here is
generous (a loaded CI machine); the exact figures are in docs/benchmarks.md (bench/ledger_scale.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import aiohttp
import orjson

from proxy.config import Config, DedicatedEndpoint
from proxy.ledger import LedgerRow, now_us

from .support import CHAT_MODEL, MESSAGES, Meter, StartMeter

ROWS = 200_000
WORST_WAIT_S = 1.0


def bulk_rows(period: str, start_us: int, n: int) -> list[LedgerRow]:
    """`n` terminal rows of `period` for tenants outside the config (no budget of theirs applies)."""
    return [bulk_row(i, period, start_us + i) for i in range(n)]


def bulk_row(i: int, period: str, started: int) -> LedgerRow:
    return LedgerRow(f"req_bulk_{i:07d}", f"bulk-{i % 7}", "k", (CHAT_MODEL, "m/b", "m/c")[i % 3], "chat",
                     "serverless", ("chat", "search", None)[i % 3], ("prod", None)[i % 2], i % 2 == 0,
                     started, period, "ok" if i % 50 else "rejected", started + 900, 200, 300 + i % 97,
                     40 + i % 13, None, usage_source="upstream", cost_pusd=9_000_000 + i,
                     reserved_pusd=10**9)  # fmt: skip


def with_endpoint(config: Config) -> Config:
    endpoint = DedicatedEndpoint("shared", CHAT_MODEL, 1000 * 10**12, "monthly_usd 1000")
    return replace(config, dedicated_endpoints=(endpoint,))


async def probe(meter: Meter, stop: asyncio.Event, waits: list[float]) -> None:
    """Small chat requests one after another until `stop`; each one's time in `waits`."""
    body = orjson.dumps({"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 4})
    headers = {**meter.auth("acme"), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for _ in range(100_000):  # bounded; `stop` ends it
            t0 = time.perf_counter()
            async with session.post(f"{meter.base_url}/chat/completions", data=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                await r.read()
            waits.append(time.perf_counter() - t0)
            if stop.is_set():
                return


async def reports(meter: Meter, rounds: int) -> list[float]:
    """Every admin read over the month, `rounds` times; how long each took."""
    auth = {"Authorization": f"Bearer {meter.admin_token}"}
    paths = [f"/admin/report?by={by}" for by in ("model", "tenant", "feature", "environment", "day")]
    paths += ["/admin/chargeback", "/admin/tenants/acme/usage", "/admin/spend", "/admin/report?format=csv"]
    took = []
    for _ in range(rounds):
        for path in paths:
            t0 = time.perf_counter()
            status, body = await meter.admin_get(path, auth)
            assert status == 200, body
            took.append(time.perf_counter() - t0)
    return took


async def test_the_public_api_keeps_answering_while_the_biggest_reports_run(start_meter: StartMeter) -> None:
    """With 200k rows this month, reports and chargebacks run while a chat probe never waits > 1 s."""
    async with start_meter(change=with_endpoint) as meter:
        now = now_us()
        period = meter.proxy.periods.of(now)
        result = await meter.proxy.ledger.import_rows(enumerate(bulk_rows(period, now - 10**9, ROWS), 1))
        assert result.added == ROWS
        auth = {"Authorization": f"Bearer {meter.admin_token}"}
        status, body = await meter.admin_get("/admin/report?by=tenant", auth)
        assert status == 200 and orjson.loads(body)["total"]["requests"] == ROWS
        waits: list[float] = []
        stop = asyncio.Event()
        task = asyncio.create_task(probe(meter, stop, waits))
        try:
            took = await reports(meter, rounds=5)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        assert len(waits) >= 5
        assert max(waits) < WORST_WAIT_S, f"worst probe wait {max(waits):.3f} s while reports ran"
        assert max(took) < 10 * WORST_WAIT_S
