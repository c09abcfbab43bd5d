"""GET /admin/report and POST /admin/estimate through a running proxy."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from .support import CHAT_MODEL, MESSAGES, SMALL_CHAT_MODEL, Meter, error_of


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
    assert (e["serverless"]["monthly_usd"], e["batch"]["monthly_usd"]) == ("12000", "6000")
    assert "$0.0060 per request" in e["summary"]
    rows = await traffic(meter)
    body_l = {"from_ledger": True, "window": "1d", "model": CHAT_MODEL, "dedicated_monthly_usd": "100"}
    status, body = await admin_post(meter, "/admin/estimate", body_l, meter.admin_token)
    assert status == 200, body
    (e,) = json.loads(body)["estimates"]
    measured = [r for r in rows if r.model == CHAT_MODEL]
    assert Decimal(e["traffic"]["requests_per_month"]) == len(measured) * 30
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
