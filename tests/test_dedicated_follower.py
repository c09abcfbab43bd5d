"""The dedicated endpoint follower (proxy/server/dedicated.py) against the real simulator.

The follower and the simulator share one clock that the test moves by hand, so minutes are exact
and nothing sleeps: each `poll_once` is one look at every endpoint, at the time the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy import simulator
from proxy.config import Config, load_config
from proxy.core.budgets import Periods
from proxy.core.dedicated import measured, minute_cost_pusd
from proxy.ledger.sqlite import SQLiteLedger
from proxy.server.dedicated import DedicatedFollower
from proxy.simulator import DEDICATED, DedicatedFleet, RunningSimulator
from proxy.upstream.client import UpstreamClient
from tests.test_docs import ROOT

NOV_S = 1_793_491_200  # 2026-11-01T00:00:00Z, in seconds
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
A100 = "2x_nvidia_a100_80gb_sxm"  # 5.42 cents a minute in the simulator
H100 = "1x_nvidia_h100_80gb_sxm"  # 3.99


@dataclass
class Clock:
    """Seconds since the epoch, moved by the test; `step` is added after every read (0: still)."""

    now: float = NOV_S + 0.5
    step: float = 0.0

    def seconds(self) -> float:
        value = self.now
        self.now += self.step
        return value

    def micros(self) -> int:
        return round(self.seconds() * 1_000_000)


@dataclass
class Rig:
    sim: RunningSimulator
    fleet: DedicatedFleet
    follower: DedicatedFollower
    ledger: SQLiteLedger
    clock: Clock
    config: Config

    async def at_minute(self, minute: int, second: float = 1.0) -> list[Any]:
        """One look at every endpoint at `second` into absolute minute `minute`."""
        self.clock.now = minute * 60 + second
        return await self.follower.poll_once()

    async def measured(self) -> list[Any]:
        return measured(await self.ledger.endpoint_minutes("2026-11"))

    def hardware_gets(self) -> int:
        return sum(1 for s in self.sim.seen if s["path"] == "/v1/hardware")


def configured(url: str, **dedicated: Any) -> Config:
    config = load_config(ROOT / "config" / "example.yaml")
    settings = replace(config.dedicated, **dedicated)
    return replace(config, upstream=replace(config.upstream, url=url), dedicated=settings)


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, change: Callable[[Config], Config] = lambda c: c, **dedicated: Any
) -> AsyncIterator[Rig]:
    clock = Clock()
    sim = await simulator.start()
    upstream = None
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    try:
        fleet = sim.app[DEDICATED]
        fleet.clock = clock.seconds
        config = change(configured(sim.url, **dedicated))
        upstream = UpstreamClient(config.upstream, "sk-operator-follower-test")
        await upstream.start()
        await ledger.open()
        follower = DedicatedFollower(ledger, upstream, lambda: config, Periods(), clock.micros)
        yield Rig(sim, fleet, follower, ledger, clock, config)
    finally:
        await ledger.close()
        if upstream is not None:
            await upstream.close()
        await sim.stop()


async def test_a_scaling_endpoint_is_recorded_minute_by_minute_equal_to_the_bill(tmp_path: Path) -> None:
    """1 -> 3 -> 0 replicas over 7 minutes, looked at every minute (twice in some): the ledger's
    cost equals the simulator's bill to the pico-dollar; each minute is there once."""
    async with rig(tmp_path) as r:
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, A100, [(0, 1), (2, 3), (5, 0)], start_minute=m0)
        r.follower.config = lambda: replace(r.config, dedicated=replace(r.config.dedicated, follow=(ep.id,)))
        for minute in range(m0 - 1, m0 + 7):
            await r.at_minute(minute)
            if minute % 2:
                await r.at_minute(minute, 40.0)  # a second look in the same minute changes nothing
        (m,) = await r.measured()
        bill = r.fleet.bill_pusd(m0 + 6)
        assert bill == (1 * 2 + 3 * 3) * minute_cost_pusd(1, Decimal("5.42")) == 596_200_000_000
        assert m.cost_pusd == bill
        assert (m.minutes, m.replica_minutes, m.unobserved_minutes, m.unknown_minutes) == (8, 11, 0, 0)
        assert r.follower.metrics.cost_pusd[ep.id] == bill
        assert r.follower.metrics.minutes[ep.id] == 8
        assert r.follower.metrics.replicas == {(ep.id, A100): 0}
        assert r.hardware_gets() == 1  # prices are cached (prices_refresh_seconds)


async def test_a_look_across_a_minute_boundary_is_repeated_then_dropped(tmp_path: Path) -> None:
    """A round trip that straddles a boundary names no minute: it is looked at again at once; if
    that straddles too, nothing is recorded (counted as `straddled`), never a guess."""
    async with rig(tmp_path) as r:
        ep = r.fleet.add(MODEL, H100, [(0, 2)], start_minute=r.fleet.minute_now())
        r.follower.config = lambda: replace(r.config, dedicated=replace(r.config.dedicated, follow=(ep.id,)))
        base = r.fleet.minute_now()
        r.clock.step = 0.4  # every clock read moves 0.4 s on: a look spans 0.8 s
        r.clock.now = (base + 1) * 60 - 0.5  # the first look straddles, the second does not
        (seen,) = await r.follower.poll_once()
        assert seen.minute_start == (base + 1) * 60_000_000 and seen.replicas == 2
        r.clock.step = 30.0  # every look now straddles a boundary
        assert await r.follower.poll_once() == []
        assert r.follower.metrics.failures == {"straddled": 1}
        (m,) = await r.measured()
        assert m.minutes == 1 and m.cost_pusd == minute_cost_pusd(2, Decimal("3.99"))


async def test_minutes_nobody_looked_at_are_not_invented(tmp_path: Path) -> None:
    """Looks at minutes 0-2 and 5-6 only: the ledger holds 5 minutes, says 2 were not observed, and
    falls short of the bill by exactly those two minutes (the proxy was down: never guessed)."""
    async with rig(tmp_path) as r:
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, A100, [(0, 2)], start_minute=m0)
        r.follower.config = lambda: replace(r.config, dedicated=replace(r.config.dedicated, follow=(ep.id,)))
        for offset in (0, 1, 2, 5, 6):
            await r.at_minute(m0 + offset)
        (m,) = await r.measured()
        per_minute = minute_cost_pusd(2, Decimal("5.42"))
        assert (m.minutes, m.unobserved_minutes) == (5, 2)
        assert m.cost_pusd == r.fleet.bill_pusd(m0 + 6) - 2 * per_minute
        assert r.follower.metrics.unobserved == {ep.id: 2}
        assert "2 minute(s) not observed" in m.basis


async def test_an_autoscaling_endpoint_is_unknown_within_its_bounds(tmp_path: Path) -> None:
    """min 1, max 3 and a script inside: the v1 object does not say how many run, so the ledger
    records no count and no cost, only bounds, and the real bill lies within them."""
    async with rig(tmp_path) as r:
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, A100, [(0, 1), (1, 3), (2, 2)], start_minute=m0, autoscaling=(1, 3))
        r.follower.config = lambda: replace(r.config, dedicated=replace(r.config.dedicated, follow=(ep.id,)))
        for offset in range(3):
            await r.at_minute(m0 + offset)
        (m,) = await r.measured()
        assert (m.known_minutes, m.unknown_minutes, m.cost_pusd) == (0, 3, 0)
        assert m.unknown_low_pusd <= r.fleet.bill_pusd(m0 + 2) <= (m.unknown_high_pusd or 0)
        assert r.follower.metrics.replicas == {}  # no gauge while the count is unknown


async def test_discovery_and_unknown_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """discover: every dedicated endpoint the account lists is followed; a followed id the upstream
    does not know records nothing and is logged once."""
    async with rig(tmp_path, discover=True, follow=("endpoint-gone",)) as r:
        a = r.fleet.add(MODEL, A100, [(0, 1)], start_minute=r.fleet.minute_now())
        b = r.fleet.add("deepseek-ai/DeepSeek-V3", H100, [(0, 2)], start_minute=r.fleet.minute_now())
        caplog.set_level(logging.WARNING, "proxy.server.dedicated")
        now = r.fleet.minute_now()
        first = await r.at_minute(now, 2.0)
        await r.at_minute(now, 30.0)
        assert sorted(x.endpoint_id for x in first) == sorted([a.id, b.id])
        assert sum("endpoint-gone" in rec.getMessage() for rec in caplog.records) == 1
        found = {x.endpoint_id: x for x in await r.measured()}
        assert found[b.id].model == "deepseek-ai/DeepSeek-V3" and found[b.id].replica_minutes == 2


async def test_the_follower_task_stops_when_cancelled(tmp_path: Path) -> None:
    """start() runs the loop in the background; stop() cancels it at once, between or during looks."""
    async with rig(tmp_path, poll_seconds=0.01, follow=("endpoint-x",)) as r:
        r.clock.now = NOV_S + 1
        await r.follower.start()
        for _ in range(50):  # bounded: until it has looked a few times
            if sum(1 for s in r.sim.seen if s["path"] == "/v1/endpoints/endpoint-x") >= 3:
                break
            await asyncio.sleep(0.02)
        await r.follower.stop()
        seen = len(r.sim.seen)
        await asyncio.sleep(0.05)
        assert len(r.sim.seen) == seen  # nothing looks any more
        assert r.follower.enabled


async def test_a_hardware_without_a_price_leaves_the_cost_unknown(tmp_path: Path) -> None:
    """An endpoint on a hardware GET /v1/hardware does not list: its count is recorded, its cost is
    unknown (NULL, never 0), and the prices are asked again at most once a minute meanwhile."""
    async with rig(tmp_path) as r:
        r.fleet.hardware["8x_nvidia_b200_192gb_sxm"] = Decimal("30")  # billed, but not listed
        m0 = r.fleet.minute_now() + 1
        ep = r.fleet.add(MODEL, "8x_nvidia_b200_192gb_sxm", [(0, 2)], start_minute=m0)
        r.follower.config = lambda: replace(r.config, dedicated=replace(r.config.dedicated, follow=(ep.id,)))
        for second in (1, 15, 30, 45):
            (seen,) = await r.at_minute(m0, second)
            assert (seen.replicas, seen.cents_per_minute, seen.cost_pusd) == (2, None, None)
        assert r.hardware_gets() == 1  # read once: not again within the minute
        await r.at_minute(m0 + 1, 2)
        assert r.hardware_gets() == 2  # a minute later: asked again (it may be listed by now)
        (m,) = await r.measured()
        assert (m.minutes, m.known_minutes, m.cost_pusd, m.unknown_high_pusd) == (2, 0, 0, None)
        assert r.follower.metrics.replicas == {(ep.id, "8x_nvidia_b200_192gb_sxm"): 2}
        assert ep.id not in r.follower.metrics.cost_pusd
