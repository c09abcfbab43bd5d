"""Budgets end to end: hard limits under a concurrent burst, reservations, restart, admin API."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.config import Config
from proxy.core.budgets import Budget
from proxy.core.pricing import PriceTable, Rates

from .support import MESSAGES, Meter, StartMeter, error_of

FLAT = "test/flat-rate"  # $0 per 1M input, $1 per 1M output: a request's reservation = max_tokens
PER_REQUEST_TOKENS = 1000  # 1000 output tokens at $1/1M = $0.001 = 1 % of the budget below
BUDGET = Budget(100_000_000_000, hard_limit=True)  # $0.10 in pico-USD


def flat_budget(config: Config, budget: Budget = BUDGET) -> Config:
    """Add the flat-rate model and give acme a budget of exactly 100 such requests."""
    models = dict(config.prices.models)
    models[FLAT] = Rates(0, 1_000_000, 0, 500_000)
    prices = PriceTable(models, config.prices.source)
    tenants = dict(config.tenants)
    tenants["acme"] = replace(tenants["acme"], budget=budget)
    return replace(config, prices=prices, tenants=tenants)


async def post(session: aiohttp.ClientSession, meter: Meter, body: dict[str, Any]) -> tuple[int, bytes]:
    async with session.post(
        meter.base_url + "/chat/completions",
        data=orjson.dumps(body),
        headers={**meter.auth("acme"), "Content-Type": "application/json"},
    ) as r:
        return r.status, await r.read()


async def budgets_view(meter: Meter) -> dict[str, Any]:
    status, body = await meter.admin_get("/admin/budgets", {"Authorization": f"Bearer {meter.admin_token}"})
    assert status == 200, body
    return json.loads(body)


async def test_500_simultaneous_requests_at_1_percent_admit_exactly_100(start_meter: StartMeter) -> None:
    """A burst of 500 requests each reserving 1 % of a hard budget: exactly 100 go upstream."""
    async with start_meter(change=flat_budget) as meter:
        # every admitted request is held upstream for 2 s, so all 500 are decided while the
        # first 100 are still in flight: only the reservations can stop the overspend
        body = {
            "model": FLAT,
            "messages": MESSAGES,
            "max_tokens": PER_REQUEST_TOKENS,
            "simulate": {"delay_ms": 2000, "completion_tokens": 10},
        }
        barrier = asyncio.Barrier(500)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:

            async def one() -> tuple[int, bytes]:
                await barrier.wait()
                return await post(s, meter, body)

            results = await asyncio.gather(*(one() for _ in range(500)))
        statuses = [status for status, _ in results]
        assert statuses.count(200) == 100
        assert statuses.count(429) == 400
        refused = error_of(next(b for s, b in results if s == 429))
        assert refused["type"] == "insufficient_quota" and refused["code"] == "budget_exceeded"
        assert meter.proxy.budgets.period in refused["message"] and "remaining" in refused["message"]
        assert len(meter.sim.billed.entries) == 100  # nothing refused was forwarded
        rows = await meter.rows()
        assert sorted({r.status for r in rows}) == ["ok", "rejected"]
        assert sum(r.status == "ok" for r in rows) == 100
        assert {r.error_code for r in rows if r.status == "rejected"} == {"budget_exceeded"}
        spent = sum(r.cost_pusd or 0 for r in rows)
        assert spent == 100 * 10 * 1_000_000  # settled at the actual 10 tokens, not the reservation
        # the view: on PostgreSQL the book takes every replica's spend from the accounts each
        # second (BUDGET_SYNC_INTERVAL), and a read begun before the last commits shows less for
        # up to that long; it must then agree exactly (bounded wait)
        view: dict[str, Any] = {}
        for _ in range(50):  # at most 50 x 0.1 s
            view = (await budgets_view(meter))["tenants"]["acme"]["budget"]
            if Decimal(view["spent_usd"]) == Decimal(spent) / 10**12 and view["reserved_usd"] == "0":
                break
            await asyncio.sleep(0.1)
        assert view["reserved_usd"] == "0"  # every reservation settled
        assert Decimal(view["spent_usd"]) == Decimal(spent) / 10**12


async def test_reservations_return_to_zero_after_mixed_outcomes(start_meter: StartMeter) -> None:
    """After ok, upstream-error, cut-stream and client-disconnect requests nothing stays reserved."""
    big = Budget(10**15, hard_limit=True)  # $1000: never refuses here
    async with start_meter(change=lambda c: flat_budget(c, big)) as meter:
        base = {"model": FLAT, "messages": MESSAGES, "max_tokens": 50}
        async with aiohttp.ClientSession() as s:
            outcomes = await asyncio.gather(
                post(s, meter, base),
                post(s, meter, base | {"stream": True}),
                post(s, meter, base | {"simulate": {"status": 500}}),
                post(s, meter, base | {"stream": True, "simulate": {"cut_after_chunks": 3}}),
                return_exceptions=True,
            )
            # a client that leaves mid-stream
            async with s.post(
                meter.base_url + "/chat/completions",
                data=orjson.dumps(base | {"stream": True, "simulate": {"chunk_delay_ms": 50}}),
                headers={**meter.auth("acme"), "Content-Type": "application/json"},
            ) as r:
                await r.content.readline()
        assert [o[0] for o in outcomes if isinstance(o, tuple)][:3] == [200, 200, 500]
        rows = await meter.wait_terminal(5)
        assert {r.status for r in rows} >= {"ok", "upstream_error", "upstream_aborted", "client_aborted"}
        book = meter.proxy.budgets
        assert book.snapshot()[("acme", None)][2] == 0  # reserved
        assert book.spent_all["acme"] == sum(r.cost_pusd or 0 for r in rows)


async def test_spend_and_budget_gauges_survive_a_restart(start_meter: StartMeter) -> None:
    """After a restart the month-to-date and remaining gauges are recomputed from the ledger."""
    async with start_meter(change=flat_budget) as meter:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                status, _ = await post(s, meter, {"model": FLAT, "messages": MESSAGES, "max_tokens": 20})
                assert status == 200
        before = await meter.metric_samples()
        await meter.restart()
        after = await meter.metric_samples()
        for name in (
            "together_meter_spend_month_to_date_usd",
            "together_meter_budget_usd",
            "together_meter_budget_remaining_usd",
            "together_meter_budget_reserved_usd",
        ):
            assert after[name] == before[name], name
        spend = after["together_meter_spend_month_to_date_usd"][(("tenant", "acme"),)]
        assert spend == 3 * 20 / 1e6
        remaining = after["together_meter_budget_remaining_usd"][(("tenant", "acme"),)]
        assert abs(remaining - (0.10 - 3 * 20 / 1e6)) < 1e-12
        thresholds = after["together_meter_budget_alert_threshold_ratio"]
        acme = sorted(v for labels, v in thresholds.items() if ("tenant", "acme") in labels)
        assert acme == [0.5, 0.8, 1.0]


async def test_admin_usage_breaks_a_period_down_and_needs_the_operator_token(meter: Meter) -> None:
    """GET /admin/tenants/{t}/usage sums the ledger by model/feature/environment; tenant keys get 401."""
    client = meter.openai("acme")
    for feature in ("chat", "search", "search"):
        await client.chat.completions.create(
            model="meta-llama/Llama-3.3-70B-Instruct-Turbo",
            messages=MESSAGES,
            max_tokens=5,
            extra_headers={"X-Meter-Feature": feature, "X-Meter-Environment": "prod"},
        )
    status, _ = await meter.admin_get("/admin/tenants/acme/usage", meter.auth("acme"))
    assert status == 401
    status, body = await meter.admin_get(
        "/admin/tenants/acme/usage", {"Authorization": f"Bearer {meter.admin_token}"}
    )
    assert status == 200
    data = json.loads(body)
    by_feature = {r["feature"]: r for r in data["breakdown"]}
    assert by_feature["search"]["requests"] == 2 and by_feature["chat"]["requests"] == 1
    rows = await meter.rows()
    assert (
        sum(Decimal(r["cost_usd"]) for r in data["breakdown"])
        == Decimal(sum(r.cost_pusd or 0 for r in rows)) / 10**12
    )
    status, body = await meter.admin_get(
        "/admin/tenants/acme/usage?period=2026-13", {"Authorization": f"Bearer {meter.admin_token}"}
    )
    assert status == 400


async def test_reload_changes_budgets_without_dropping_traffic(start_meter: StartMeter) -> None:
    """POST /admin/reload applies a new budget; a stream in flight during the reload completes."""
    async with start_meter(change=flat_budget) as meter:
        tight = flat_budget(meter.proxy.config, Budget(500_000_000, hard_limit=True))  # $0.0005
        meter.proxy._loader = lambda: tight
        body = {"model": FLAT, "messages": MESSAGES, "max_tokens": PER_REQUEST_TOKENS}
        async with aiohttp.ClientSession() as s:
            async with s.post(
                meter.base_url + "/chat/completions",
                data=orjson.dumps(
                    body | {"stream": True, "max_tokens": 30, "simulate": {"chunk_delay_ms": 20}}
                ),
                headers={**meter.auth("acme"), "Content-Type": "application/json"},
            ) as stream:
                first = await stream.content.readline()
                assert first.startswith(b"data: ")
                async with s.post(
                    meter.admin + "/admin/reload", headers={"Authorization": f"Bearer {meter.admin_token}"}
                ) as r:
                    assert r.status == 200
                    assert (await r.json())["restart_required"] == []
                rest = await stream.read()
                assert rest.rstrip().endswith(b"data: [DONE]")
            # $0.001 per request no longer fits in a $0.0005 budget
            status, refused = await post(s, meter, body)
        assert status == 429 and error_of(refused)["code"] == "budget_exceeded"
        view = (await budgets_view(meter))["tenants"]["acme"]["budget"]
        assert view["budget_usd"] == "0.0005"
        assert view["reserved_usd"] == "0"


async def test_month_rollover_with_an_injected_clock(start_meter: StartMeter) -> None:
    """Requests belong to the period they started in; a new month's spend starts from zero."""
    nov_end = int(dt.datetime(2026, 11, 30, 23, 59, 58, tzinfo=dt.UTC).timestamp() * 1e6)
    dec_start = int(dt.datetime(2026, 12, 1, 0, 0, 2, tzinfo=dt.UTC).timestamp() * 1e6)
    now = [nov_end]
    async with start_meter(change=flat_budget) as meter:
        meter.proxy.clock = meter.proxy.relay.clock = lambda: now[0]
        body = {"model": FLAT, "messages": MESSAGES, "max_tokens": PER_REQUEST_TOKENS}
        async with aiohttp.ClientSession() as s:
            assert (await post(s, meter, body))[0] == 200
            # started in November, still running when December begins
            slow = asyncio.ensure_future(post(s, meter, body | {"simulate": {"delay_ms": 800}}))
            await asyncio.sleep(0.3)
            now[0] = dec_start
            assert (await post(s, meter, body))[0] == 200
            assert (await slow)[0] == 200
        rows = await meter.wait_terminal(3)
        assert sorted(r.period for r in rows) == ["2026-11", "2026-11", "2026-12"]
        per_request = PER_REQUEST_TOKENS * 1_000_000  # pico-USD at $1 per 1M output tokens
        assert meter.proxy.budgets.period == "2026-12"
        assert meter.proxy.budgets.spent_all == {"acme": per_request}  # only December's request
        samples = await meter.metric_samples()
        acme = (("tenant", "acme"),)
        assert samples["together_meter_spend_month_to_date_usd"][acme] == per_request / 1e12
        assert samples["together_meter_budget_reserved_usd"][acme] == 0
        remaining = samples["together_meter_budget_remaining_usd"][acme]
        assert abs(remaining - (BUDGET.monthly_pusd - per_request) / 1e12) < 1e-12
        end = samples["together_meter_budget_period_end_timestamp_seconds"][acme]
        assert end == dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()


async def test_openai_sdk_does_not_retry_a_budget_refusal(start_meter: StartMeter) -> None:
    """429 budget_exceeded says x-should-retry: false, so the SDK (2 retries by default) sends once."""
    from openai import AsyncOpenAI, RateLimitError

    async with start_meter(change=lambda c: flat_budget(c, Budget(0, hard_limit=True))) as meter:
        client = AsyncOpenAI(base_url=meter.base_url, api_key=meter.keys["acme"], max_retries=2)
        try:
            with pytest.raises(RateLimitError) as caught:
                await client.chat.completions.create(model=FLAT, messages=MESSAGES, max_tokens=5)
        finally:
            await client.close()
        assert caught.value.code == "budget_exceeded"
        rows = await meter.rows()
        assert [r.status for r in rows] == ["rejected"]  # one attempt, not three
        assert meter.sim.billed.entries == []
