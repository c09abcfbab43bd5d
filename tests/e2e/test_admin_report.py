"""GET /admin/report and POST /admin/estimate through a running proxy."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.config import Config, DedicatedEndpoint

from .support import CHAT_MODEL, MESSAGES, SMALL_CHAT_MODEL, Meter, StartMeter, error_of


async def admin_post(meter: Meter, path: str, body: Any, token: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            meter.admin + path, data=orjson.dumps(body), headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        return r.status, await r.read()


async def traffic(meter: Meter) -> list[Any]:
    for tenant, model in (("acme", CHAT_MODEL), ("acme", SMALL_CHAT_MODEL), ("globex", CHAT_MODEL)):
        await meter.openai(tenant).chat.completions.create(model=model, messages=MESSAGES, max_tokens=8)
    return await meter.wait_terminal(3)


async def test_report_totals_equal_the_ledger_rows(meter: Meter) -> None:
    """JSON and CSV reports sum exactly to the ledger's rows, with a forecast for this month."""
    rows = await traffic(meter)
    month = rows[0].period
    auth = {"Authorization": f"Bearer {meter.admin_token}"}
    status, body = await meter.admin_get(f"/admin/report?month={month}&by=tenant", auth)
    assert status == 200, body
    data = json.loads(body)
    assert data["total"]["requests"] == len(rows)
    assert data["total"]["input_tokens"] == sum(r.prompt_tokens or 0 for r in rows)
    assert data["total"]["output_tokens"] == sum(r.completion_tokens or 0 for r in rows)
    assert Decimal(data["total"]["cost_usd"]) == Decimal(sum(r.cost_pusd or 0 for r in rows)).scaleb(-12)
    assert {g["key"] for g in data["groups"]} == {"acme", "globex"}
    assert "run rate" in data["forecast"]["window"]
    status, body = await meter.admin_get(f"/admin/report?month={month}&tenant=acme&format=csv", auth)
    assert status == 200, body
    lines = {r["model"]: r for r in csv.DictReader(io.StringIO(body.decode()))}
    assert set(lines) == {CHAT_MODEL, SMALL_CHAT_MODEL, "total"}
    acme_cost = sum(r.cost_pusd or 0 for r in rows if r.tenant == "acme")
    assert Decimal(lines["total"]["cost_usd"]) == Decimal(acme_cost).scaleb(-12)


async def test_estimate_seed_and_from_ledger(meter: Meter) -> None:
    """The seed example through the API; measured traffic comes from the proxy's own ledger."""
    seed = {
        "model": "arcee-ai/maestro-reasoning",
        "requests_per_month": 2_000_000,
        "input_tokens": 3000,
        "output_tokens": 1000,
    }
    status, body = await admin_post(meter, "/admin/estimate", seed, meter.admin_token)
    assert status == 200, body
    (e,) = json.loads(body)["estimates"]
    assert (e["serverless"]["monthly_usd"], e["batch"]["monthly_usd"]) == ("12000", "12000")
    assert (e["batch"]["terms"], e["batch"]["note"]) == ("none", "no batch discount")  # together: maestro
    assert "$0.006000 per request" in e["summary"]
    rows = await traffic(meter)
    body_l = {"from_ledger": True, "window": "1d", "model": CHAT_MODEL, "dedicated_monthly_usd": "100"}
    status, body = await admin_post(meter, "/admin/estimate", body_l, meter.admin_token)
    assert status == 200, body
    (e,) = json.loads(body)["estimates"]
    measured = [r for r in rows if r.model == CHAT_MODEL]
    # 1d widened to whole days: yesterday and today so far, so between 1 and 2 days of traffic
    assert len(measured) * 15 < Decimal(e["traffic"]["requests_per_month"]) <= len(measured) * 30
    assert e["dedicated"]["break_even_monthly_tokens"] > 0


async def test_bad_parameters_400_and_tenant_key_401(meter: Meter) -> None:
    """Bad parameters get an OpenAI-shaped 400; a tenant key gets 401 on both routes."""
    auth = {"Authorization": f"Bearer {meter.admin_token}"}
    for query in ("month=2026-13", "by=colour", "format=xml"):
        status, body = await meter.admin_get(f"/admin/report?{query}", auth)
        assert status == 400, query
        assert error_of(body)["type"] == "invalid_request_error"
    status, body = await admin_post(meter, "/admin/estimate", {"model": "x", "bogus": 1}, meter.admin_token)
    assert status == 400 and "bogus" in error_of(body)["message"]
    status, body = await admin_post(meter, "/admin/estimate", [1], meter.admin_token)
    assert status == 400
    status, _ = await meter.admin_get("/admin/report", meter.auth("acme"))
    assert status == 401
    status, _ = await admin_post(meter, "/admin/estimate", {}, meter.keys["acme"])
    assert status == 401


def with_shared_endpoint(config: Config) -> Config:
    """$1,000/month for CHAT_MODEL, shared by whoever calls it."""
    endpoint = DedicatedEndpoint("shared-70b", CHAT_MODEL, 1000 * 10**12, "monthly_usd 1000")
    return replace(config, dedicated_endpoints=(endpoint,))


async def test_chargeback_spreads_the_endpoint_by_token_share(start_meter: StartMeter) -> None:
    """GET /admin/chargeback: each tenant pays its token share; charges add up to the monthly cost."""
    async with start_meter(change=with_shared_endpoint) as meter:
        rows = await traffic(meter)
        month = rows[0].period
        auth = {"Authorization": f"Bearer {meter.admin_token}"}
        status, body = await meter.admin_get(f"/admin/chargeback?month={month}", auth)
        assert status == 200, body
        (ep,) = json.loads(body)["endpoints"]
        used = [r for r in rows if r.model == CHAT_MODEL]
        tokens = {
            t: sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in used if r.tenant == t)
            for t in ("acme", "globex")
        }
        assert ep["tokens"] == sum(tokens.values()) > 0
        got = {t["tenant"]: t for t in ep["tenants"]}
        assert {t: got[t]["tokens"] for t in got} == tokens
        assert sum(Decimal(t["charge_usd"]) for t in ep["tenants"]) == 1000
        assert sum(Decimal(t["share"]) for t in ep["tenants"]) == pytest.approx(1, abs=Decimal("1e-5"))
        for t, n in tokens.items():
            exact = Decimal(1000) * n / sum(tokens.values())
            assert abs(Decimal(got[t]["charge_usd"]) - exact) <= Decimal("1e-12")
            serverless = sum(r.cost_pusd or 0 for r in used if r.tenant == t)
            assert Decimal(got[t]["serverless_usd"]) == Decimal(serverless).scaleb(-12)
        status, body = await meter.admin_get(
            f"/admin/chargeback?month={month}&format=csv&tenant=globex", auth
        )
        assert status == 200, body
        lines = [r["tenant"] for r in csv.DictReader(io.StringIO(body.decode()))]
        assert lines == ["globex", "total"]
        status, body = await meter.admin_get("/admin/chargeback?month=2026-13", auth)
        assert status == 400 and error_of(body)["type"] == "invalid_request_error"
        status, _ = await meter.admin_get("/admin/chargeback", meter.auth("acme"))
        assert status == 401
