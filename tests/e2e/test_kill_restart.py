"""SIGKILL under streaming load, then restart on the same ledger (issue 7, scenario 3).

The real proxy runs as a subprocess in front of the in-process simulator. After each kill and
restart: SQLite integrity_check is ok; every client that saw `[DONE]` has a committed `ok` row
with the tokens it asked for; every request id a client saw is in the ledger once; nothing is
left in flight (the reaper made it `orphaned` at its reserved cost, flagged estimated); the
rollups equal the GROUP BY of the rows; the budget gauges on /metrics equal the ledger's sums.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy import simulator
from proxy.core.budgets import Periods

from .procs import (
    Outcome,
    ProxyProcess,
    integrity,
    ledger_rows,
    rollups_match_rows,
    stream_chat,
    write_config,
)

CLIENTS = 20
CHUNK_DELAY_MS = 40.0  # client i streams 4 + 2*i chunks: about 0.2 s to 1.7 s
ACME_BUDGET_USD = 500.0  # config/example.yaml


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[tuple[ProxyProcess, str]]:
    sim = await simulator.start()
    config, key = write_config(tmp_path)
    p = ProxyProcess(config, tmp_path / "ledger.db", sim.url, tmp_path / "proxy.log")
    try:
        yield p, key
    finally:
        await p.kill()
        await sim.stop()


async def load_then_kill(p: ProxyProcess, key: str, clients: int = CLIENTS) -> list[Outcome]:
    """Start `clients` streams, SIGKILL the proxy once some finished and some are mid-stream."""
    outcomes = [Outcome(completion_tokens=4 + 2 * i) for i in range(clients)]
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(stream_chat(session, p.url, key, o, CHUNK_DELAY_MS)) for o in outcomes]
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                done = sum(o.done for o in outcomes)
                mid = sum(o.started and not o.done and o.body != b"" for o in outcomes)
                if done >= 3 and mid >= 3:
                    break
                await asyncio.sleep(0.01)
            p.signal(signal.SIGKILL)
            await p.wait(10)
            async with asyncio.timeout(15):
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    assert sum(o.done for o in outcomes) >= 3, "no client finished before the kill"
    assert sum(not o.done for o in outcomes) >= 3, "every client finished before the kill"
    return outcomes


async def check_after_restart(p: ProxyProcess, outcomes: list[Outcome], sent: int) -> dict[str, int]:
    """The scenario-3 invariants on the restarted proxy; returns figures for the next round."""
    assert integrity(p.ledger) == "ok"
    rows = ledger_rows(p.ledger)
    assert [r for r in rows.values() if r["status"] == "in_flight"] == []
    assert len(rows) <= sent  # at most one row per request sent, over all rounds
    seen = [o for o in outcomes if o.request_id is not None]
    assert len({o.request_id for o in seen}) == len(seen)
    for o in seen:
        assert o.request_id in rows, f"{o.request_id} ({'done' if o.done else o.error}) has no row"
        row = rows[o.request_id]
        if o.done:  # I4: committed before the client saw [DONE]
            assert (row["status"], row["stream_complete"], row["usage_source"]) == ("ok", 1, "upstream")
            assert row["completion_tokens"] == o.completion_tokens
            assert row["cost_pusd"] > 0
        else:
            assert row["status"] in ("orphaned", "ok", "client_aborted"), row
    orphans = [r for r in rows.values() if r["status"] == "orphaned"]
    for r in orphans:
        assert r["cost_pusd"] == r["reserved_pusd"] > 0
        assert (r["usage_source"], r["error_code"]) == ("estimated", "process_died")
    cut = [o for o in seen if not o.done]
    assert sum(rows[o.request_id]["status"] == "orphaned" for o in cut) >= 1
    assert rollups_match_rows(p.ledger, Periods("UTC"))  # config/example.yaml: budgets.timezone UTC
    # I7: the gauges the restarted proxy serves are the ledger's sums
    spend = sum(r["cost_pusd"] for r in rows.values() if r["tenant"] == "acme") / 1e12
    gauges = await p.gauges()
    assert gauges[("together_meter_spend_month_to_date_usd", "acme")] == pytest.approx(spend, abs=1e-9)
    assert gauges[("together_meter_budget_remaining_usd", "acme")] == pytest.approx(
        ACME_BUDGET_USD - spend, abs=1e-9
    )
    return {"rows": len(rows), "orphaned": len(orphans), "done": sum(o.done for o in outcomes)}


async def kill_loop(p: ProxyProcess, key: str, rounds: int, clients: int) -> list[dict[str, int]]:
    figures = []
    sent = 0
    await p.start()
    for _ in range(rounds):
        outcomes = await load_then_kill(p, key, clients)
        sent += clients
        await p.start()  # same ledger: the reaper runs before it listens
        figures.append(await check_after_restart(p, outcomes, sent))
    return figures


async def test_sigkill_under_streaming_load_loses_no_finished_request(
    proc: tuple[ProxyProcess, str],
) -> None:
    """20 streams, SIGKILL mid-way, restart: finished -> ok rows, cut -> orphaned at reserve."""
    p, key = proc
    (figures,) = await kill_loop(p, key, rounds=1, clients=CLIENTS)
    assert figures["rows"] == CLIENTS  # every request was admitted before the kill
    assert figures["done"] >= 3 and figures["orphaned"] >= 1


async def test_kill_loop_keeps_the_ledger_consistent(proc: tuple[ProxyProcess, str]) -> None:
    """5 rounds of start -> 20 streams -> SIGKILL -> restart keep every invariant each round."""
    p, key = proc
    figures = await kill_loop(p, key, rounds=5, clients=CLIENTS)
    assert [f["rows"] for f in figures] == [CLIENTS * (i + 1) for i in range(5)]
    assert p.starts == 6


@pytest.mark.slow
async def test_long_kill_loop(proc: tuple[ProxyProcess, str]) -> None:
    """20 rounds of 40 streams each: the same invariants hold after every SIGKILL."""
    p, key = proc
    figures = await kill_loop(p, key, rounds=20, clients=40)
    assert figures[-1]["rows"] == 20 * 40
