"""The PostgreSQL ledger end to end: replicas sharing one database, and the database going away.

Two real proxies (one process, separate listeners, ledgers and budget books) share a fresh
database on 127.0.0.1:5432 and a budget enforced in it; a real TCP fault relay between a proxy and
PostgreSQL cuts the ledger off for 3 s under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import orjson

from proxy.config import Config
from proxy.core.usage import Tokenizer
from proxy.ledger import IN_FLIGHT
from proxy.ledger.postgres import PostgresLedger
from proxy.server.app import Proxy
from tests.faultrelay import FaultRelay
from tests.pg import HOST, PORT, pg_database

from .support import CHAT_MODEL, MESSAGES, Meter, error_of, running_meter, running_meter_on
from .test_budget_alerts import spend, with_webhook
from .test_budgets import FLAT, PER_REQUEST_TOKENS, flat_budget

if TYPE_CHECKING:
    from conftest import WebhookReceiver


async def accounts_agree(meter: Meter) -> dict[tuple[str, str | None], tuple[int, int]]:
    """The accounts table, checked against sums recomputed from the rows (spent, reserved)."""
    ledger = meter.proxy.ledger
    assert isinstance(ledger, PostgresLedger)
    period = meter.proxy.budgets.period
    sums: dict[tuple[str, str | None], list[int]] = {}
    for r in await ledger.rows(period=period):
        for key in ((r.tenant, None), *(((r.tenant, r.feature),) if r.feature is not None else ())):
            s = sums.setdefault(key, [0, 0])
            if r.status == IN_FLIGHT:
                s[1] += r.reserved_pusd or 0
            else:
                s[0] += r.cost_pusd or 0
    accounts = await ledger.accounts(period)
    assert accounts == {k: (v[0], v[1]) for k, v in sums.items()}
    return accounts


@contextlib.asynccontextmanager
async def replica(meter: Meter, tokenizer: Tokenizer) -> AsyncIterator[Proxy]:
    """A second proxy on the same config and database (its own listeners, writer and budget book)."""
    second = Proxy(meter.config, meter.proxy.secrets, tokenizer=tokenizer)
    try:
        await second.start()
        yield second
    finally:
        await second.stop()


async def test_two_replicas_admit_exactly_100_of_500_at_1_percent(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """500 simultaneous requests split over 2 replicas, each 1 % of a hard budget: 100 go upstream."""
    start = running_meter_on("postgres", tmp_path / "unused.db", tokenizer, change=flat_budget)
    async with start as meter, replica(meter, tokenizer) as second:
        # admitted requests are held upstream for 2 s: all 500 are decided while they run,
        # so only the reservations in the shared accounts can stop the overspend
        body = orjson.dumps(
            {
                "model": FLAT,
                "messages": MESSAGES,
                "max_tokens": PER_REQUEST_TOKENS,
                "simulate": {"delay_ms": 2000, "completion_tokens": 10},
            }
        )
        urls = [f"http://127.0.0.1:{p.port}/v1/chat/completions" for p in (meter.proxy, second)]
        headers = {**meter.auth("acme"), "Content-Type": "application/json"}
        barrier = asyncio.Barrier(500)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

            async def one(i: int) -> tuple[int, int, bytes]:
                await barrier.wait()
                async with s.post(urls[i % 2], data=body, headers=headers) as r:
                    return i % 2, r.status, await r.read()

            results = await asyncio.gather(*(one(i) for i in range(500)))
        statuses = [status for _, status, _ in results]
        assert (statuses.count(200), statuses.count(429)) == (100, 400)
        refused = {error_of(b)["code"] for _, status, b in results if status == 429}
        assert refused == {"budget_exceeded"}
        assert len(meter.sim.billed.entries) == 100  # nothing refused was forwarded
        rows = await meter.wait_terminal(500)
        assert len(rows) == 500 and len({r.request_id for r in rows}) == 500
        assert sum(r.status == "ok" for r in rows) == 100
        assert {r.error_code for r in rows if r.status != "ok"} == {"budget_exceeded"}
        accounts = await accounts_agree(meter)
        assert accounts[("acme", None)] == (100 * 10 * 1_000_000, 0)  # settled at 10 tokens each
        await asyncio.sleep(1.5)  # a budget sync round: both replicas show the spend of both
        for proxy in (meter.proxy, second):
            assert proxy.budgets.spent_all["acme"] == 100 * 10 * 1_000_000
            assert proxy.budgets.snapshot()[("acme", None)][2] == 0  # nothing left reserved


async def test_a_threshold_crossed_through_two_replicas_is_posted_once(
    tmp_path: Path, tokenizer: Tokenizer, webhook: WebhookReceiver
) -> None:
    """Spend through both replicas crosses 0.5 then 0.8: one POST each, though both see the crossings."""
    start = running_meter_on("postgres", tmp_path / "unused.db", tokenizer, change=with_webhook(webhook.url))
    async with start as meter, replica(meter, tokenizer) as second:
        other = Meter(second, meter.sim, meter.keys, meter.ledger_path, meter.upstream_seen, "postgres")
        await spend(meter, 30)
        await spend(other, 30)  # 60 % of the budget, half through each replica
        await asyncio.sleep(1.5)  # a budget sync round: each replica sees both spends
        await spend(other, 25)  # 85 %
        await asyncio.sleep(1.5)
        for proxy in (meter.proxy, second):
            await proxy.notifier.drain()
            assert proxy.budgets.spent_all["acme"] == 85_000_000  # both replicas' spend
        assert sorted(p["threshold"] for p in webhook.posts) == [0.5, 0.8]
        period = meter.proxy.budgets.period
        assert sorted(await meter.proxy.ledger.notifications(period)) == [
            ("acme", None, "0.5"),
            ("acme", None, "0.8"),
        ]


async def test_ledger_outage_mid_load_loses_no_row(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """PostgreSQL cut off for 3 s under load: readiness 503 during, 200 after; every 200 has its
    row, refused requests got 503 and were not forwarded, the accounts equal the ledger."""

    def quick(config: Config) -> Config:
        return replace(config, ledger=replace(config.ledger, commit_timeout=1.0))

    async with pg_database() as dsn, await FaultRelay.start(HOST, PORT) as relay:
        relayed = f"postgresql://postgres@127.0.0.1:{relay.port}/{dsn.rsplit('/', 1)[1]}"
        async with running_meter(
            tmp_path / "unused.db", tokenizer, ledger_dsn=relayed, change=quick
        ) as meter:
            answers: list[tuple[int, str | None, bytes]] = []
            ready: list[tuple[str, int]] = []
            phase = "before"
            stop = asyncio.Event()
            body = orjson.dumps(
                {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 5, "simulate": {"delay_ms": 20}}
            )
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:

                async def client() -> None:
                    for _ in range(2000):
                        if stop.is_set():
                            return
                        async with s.post(
                            meter.base_url + "/chat/completions",
                            data=body,
                            headers={**meter.auth("acme"), "Content-Type": "application/json"},
                        ) as r:
                            answers.append((r.status, r.headers.get("x-request-id"), await r.read()))
                        await asyncio.sleep(0.01)

                async def probe() -> None:
                    for _ in range(500):
                        if stop.is_set():
                            return
                        async with s.get(meter.admin + "/readyz") as r:
                            ready.append((phase, r.status))
                        await asyncio.sleep(0.05)

                tasks = [asyncio.create_task(client()) for _ in range(8)] + [asyncio.create_task(probe())]
                try:
                    await asyncio.sleep(1.5)
                    phase = "cut"
                    relay.refuse()
                    relay.drop_all(rst=True)
                    await asyncio.sleep(3.0)
                    phase = "restored"
                    relay.passthrough()
                    deadline = time.monotonic() + 10
                    while not ready or ready[-1] != ("restored", 200):
                        assert time.monotonic() < deadline, "readiness did not recover within 10 s"
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(1.5)  # load after recovery
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
            statuses = [a[0] for a in answers]
            assert set(statuses) == {200, 503}
            assert ("before", 200) in ready and ("cut", 503) in ready and ready[-1] == ("restored", 200)
            assert {error_of(b)["code"] for status, _, b in answers if status == 503} == {"not_ready"}
            # forwarded <=> answered 200: a refused request never reached the upstream
            assert len(meter.sim.billed.entries) == statuses.count(200)
            rows = await meter.wait_terminal(statuses.count(200), within=15)
            by_id = {r.request_id: r for r in rows}
            assert len(by_id) == len(rows)  # no duplicates
            ok_ids = {rid for status, rid, _ in answers if status == 200}
            assert all(by_id[rid].status == "ok" for rid in ok_ids)  # no row lost after recovery
            refused_rows = [by_id[rid] for status, rid, _ in answers if status == 503 and rid in by_id]
            # a begin whose commit was cut mid-way may exist: it ends rejected at no cost
            assert all((r.status, r.cost_pusd) == ("rejected", 0) for r in refused_rows)
            assert len(rows) == len(ok_ids) + len(refused_rows)
            await accounts_agree(meter)
            assert statuses.count(200) > 20 and statuses.count(503) > 0
