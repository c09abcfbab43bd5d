"""Table endpoint_minutes on both backends: one line per endpoint and minute, across restarts and
replicas, the larger observation kept, exact money (proxy/ledger/endpoint_minutes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.core.budgets import Periods
from proxy.core.dedicated import EndpointMinute, measured, minute_cost_pusd, rank
from proxy.ledger import Ledger
from proxy.ledger.postgres import PostgresLedger
from proxy.ledger.sqlite import SQLiteLedger

NOV_US = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
MINUTE = 60_000_000
CENTS = Decimal("5.42")
BACKENDS = ("sqlite", "postgres")
LEDGER_DOC = Path(__file__).resolve().parent.parent / "docs" / "ledger.md"


def obs(minute: int, replicas: int | None, *, endpoint: str = "endpoint-1", cents: Decimal | None = CENTS,
        lo: int = 0, hi: int | None = 4, observed: int = 0) -> EndpointMinute:  # fmt: skip
    """An observation of `endpoint` in minute `minute` of November (None replicas: an autoscaling range)."""
    start = NOV_US + minute * MINUTE

    def cost(r: int | None) -> int | None:
        if r == 0:
            return 0
        return None if r is None or cents is None else minute_cost_pusd(r, cents)

    return EndpointMinute(
        endpoint_id=endpoint,
        minute_start=start,
        period=Periods().of(start),
        name=f"acme/{endpoint}",
        model="meta-llama/Llama-3.3-70B-Instruct-Turbo",
        hardware="2x_nvidia_a100_80gb_sxm",
        state="STARTED" if replicas != 0 else "STOPPED",
        replicas=replicas,
        min_replicas=lo if replicas is None else replicas,
        max_replicas=hi if replicas is None else replicas,
        cents_per_minute=cents,
        cost_pusd=cost(replicas),
        cost_low_pusd=cost(lo) if replicas is None else cost(replicas),
        cost_high_pusd=cost(hi) if replicas is None else cost(replicas),
        observed_us=start + observed,
    )


@contextlib.asynccontextmanager
async def ledgers(backend: str, tmp_path: Path, n: int = 1) -> AsyncIterator[list[Ledger]]:
    """`n` opened ledgers on one store (processes or replicas sharing it); closed afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        if backend == "sqlite":
            made: list[Ledger] = [SQLiteLedger(tmp_path / "ledger.db") for _ in range(n)]
        else:
            from tests.pg import pg_database

            dsn = await stack.enter_async_context(pg_database())
            made = [PostgresLedger(dsn, lease_seconds=5) for _ in range(n)]
        for ledger in made:
            await ledger.open()
            stack.push_async_callback(ledger.close)
        yield made


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_minute_is_recorded_once_and_the_larger_look_stays(backend: str, tmp_path: Path) -> None:
    """The same look twice records once; more replicas replace fewer (the delta is the cost added);
    fewer, or an unknown count, change nothing."""
    async with ledgers(backend, tmp_path) as (ledger,):
        one, three = minute_cost_pusd(1, CENTS), minute_cost_pusd(3, CENTS)
        first = await ledger.record_endpoint_minute(obs(0, 1))
        assert (first.inserted, first.replaced, first.delta_pusd) == (True, False, one)
        again = await ledger.record_endpoint_minute(obs(0, 1, observed=5))
        assert (again.inserted, again.replaced, again.delta_pusd) == (False, False, 0)
        larger = await ledger.record_endpoint_minute(obs(0, 3))
        assert (larger.inserted, larger.replaced, larger.delta_pusd) == (False, True, three - one)
        for smaller in (obs(0, 2), obs(0, None), obs(0, 0)):
            done = await ledger.record_endpoint_minute(smaller)
            assert (done.inserted, done.replaced, done.delta_pusd) == (False, False, 0)
        (line,) = await ledger.endpoint_minutes("2026-11")
        assert (line.minutes, line.known_minutes, line.replica_minutes, line.cost_pusd) == (1, 1, 3, three)
        assert line.cents_per_minute == CENTS and line.first_minute == line.last_minute == NOV_US
        assert await ledger.endpoint_minutes("2026-10") == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_restart_records_no_minute_twice(backend: str, tmp_path: Path) -> None:
    """A follower restarted on the same ledger looks at the same minutes again: nothing is added."""
    async with ledgers(backend, tmp_path, 2) as (before, after):
        for m in range(5):
            assert (await before.record_endpoint_minute(obs(m, 2))).inserted
        await before.close()  # the first process stops; the second (a restart) looks again
        for m in range(5):
            done = await after.record_endpoint_minute(obs(m, 2, observed=1))
            assert not done.inserted and done.delta_pusd == 0
        (line,) = await after.endpoint_minutes("2026-11")
        assert (line.minutes, line.cost_pusd) == (5, 5 * minute_cost_pusd(2, CENTS))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_two_followers_racing_keep_the_larger_look_of_each_minute(backend: str, tmp_path: Path) -> None:
    """Two replicas record the same 40 minutes at once with different counts: each minute ends at the
    larger look, whatever the order; the costs they report adding sum to the ledger's exactly."""
    rng = random.Random(7)
    counts = [(rng.choice([None, 0, 1, 2, 3]), rng.choice([None, 0, 1, 2, 3])) for _ in range(40)]
    async with ledgers(backend, tmp_path, 2) as (a, b):
        jobs = [a.record_endpoint_minute(obs(m, ra)) for m, (ra, _) in enumerate(counts)]
        jobs += [b.record_endpoint_minute(obs(m, rb)) for m, (_, rb) in enumerate(counts)]
        rng.shuffle(jobs)
        done = await asyncio.gather(*jobs)
        expected = [max((obs(m, ra), obs(m, rb)), key=rank) for m, (ra, rb) in enumerate(counts)]
        total = sum(e.cost_pusd or 0 for e in expected)
        assert sum(d.inserted for d in done) == 40
        assert sum(d.delta_pusd for d in done) == total
        lines = await a.endpoint_minutes("2026-11")
        (m,) = measured(lines)
        assert m.cost_pusd == total and m.minutes == 40 and m.unobserved_minutes == 0
        assert m.replica_minutes == sum(e.replicas or 0 for e in expected)
        assert m.unknown_minutes == sum(e.replicas is None for e in expected)
        assert m.unknown_high_pusd == sum(e.cost_high_pusd or 0 for e in expected if e.replicas is None)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_prices_and_unknowns_read_back_exactly(backend: str, tmp_path: Path) -> None:
    """A price with many decimals comes back digit for digit; an unknown price or count stays NULL
    (never 0); minutes not looked at show as not observed."""
    odd = Decimal("0.0541666666666667")
    async with ledgers(backend, tmp_path) as (ledger,):
        await ledger.record_endpoint_minute(obs(0, 3, cents=odd))
        await ledger.record_endpoint_minute(obs(1, 3, cents=None))  # hardware without a known price
        await ledger.record_endpoint_minute(obs(4, None, cents=odd, lo=1, hi=2))
        lines = await ledger.endpoint_minutes("2026-11")
        assert sorted(str(x.cents_per_minute) for x in lines) == ["0.0541666666666667", "None"]
        (m,) = measured(lines)
        assert m.cost_pusd == minute_cost_pusd(3, odd) == 1_625_000_000  # 0.1625 cents, exactly
        assert (m.minutes, m.known_minutes, m.unknown_minutes, m.unobserved_minutes) == (3, 1, 2, 2)
        assert m.unknown_high_pusd is None  # the unpriced minute has no upper bound
        assert m.unknown_low_pusd == minute_cost_pusd(1, odd)


async def test_a_ledger_without_the_table_reads_as_nothing_measured(tmp_path: Path) -> None:
    """A SQLite file no proxy of this version opened yet has no endpoint_minutes: nothing measured
    (reports still work); opening it adds the table (an idempotent step)."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.commit()
    conn.close()
    ledger = SQLiteLedger(path)
    assert await ledger.endpoint_minutes("2026-11") == []
    await ledger.open()
    try:
        await ledger.record_endpoint_minute(obs(0, 1))
        assert len(await ledger.endpoint_minutes("2026-11")) == 1
    finally:
        await ledger.close()
    again = SQLiteLedger(path)
    await again.open()  # the step runs again and changes nothing
    await again.close()
    assert len(await again.endpoint_minutes("2026-11")) == 1


def _columns(conn: Any) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA table_info(endpoint_minutes)")]


async def test_the_sqlite_table_has_the_documented_columns(tmp_path: Path) -> None:
    """The columns docs/ledger.md describes, keyed by (endpoint_id, minute_start)."""
    async with ledgers("sqlite", tmp_path) as _:
        conn = sqlite3.connect(tmp_path / "ledger.db")
        try:
            cols = _columns(conn)
            pk = [r[1] for r in conn.execute("PRAGMA table_info(endpoint_minutes)") if r[5]]
        finally:
            conn.close()
    doc = LEDGER_DOC.read_text(encoding="utf-8")
    assert pk == ["endpoint_id", "minute_start"]
    assert [c for c in cols if f"`{c}`" not in doc] == []
