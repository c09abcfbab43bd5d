"""The simulator's dedicated endpoints (proxy/simulator/endpoints.py): together's v1 shapes, a replica
script per minute, and a bill of endpoint-minutes at the hardware's price."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from proxy import simulator
from proxy.simulator import DEDICATED, DedicatedFleet, RunningSimulator

MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
A100 = "2x_nvidia_a100_80gb_sxm"
AUTH = {"Authorization": "Bearer sk-sim"}
# the spec's required fields (openapi.yaml components DedicatedEndpoint, ListEndpoint)
DEDICATED_FIELDS = {"object", "id", "name", "display_name", "model", "hardware", "type", "owner", "state"}
DEDICATED_FIELDS |= {"autoscaling", "created_at"}
LIST_FIELDS = {"id", "object", "name", "model", "type", "owner", "state", "created_at"}


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await simulator.start()
    try:
        yield running
    finally:
        await running.stop()


async def get(sim: RunningSimulator, path: str, headers: dict[str, str] | None = AUTH) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(sim.origin + path, headers=headers) as r:
        return r.status, await r.json()


def scripted(now: list[float]) -> DedicatedFleet:
    fleet = DedicatedFleet({A100: Decimal("5.42")}, clock=lambda: now[0], minute_seconds=1.0)
    return fleet


def test_the_script_sets_replicas_per_minute_and_the_bill() -> None:
    """Minute by minute: stopped before the script, then 1, 3, 0; billed replicas x 5.42 cents each."""
    now = [1000.2]
    fleet = scripted(now)
    ep = fleet.add(MODEL, A100, [(0, 1), (2, 3), (5, 0)])  # starts at minute 1001
    states = []
    for minute in range(1000, 1008):
        now[0] = minute + 0.5
        obj = fleet.object(ep)
        states.append((obj["state"], obj["autoscaling"]["min_replicas"], obj["autoscaling"]["max_replicas"]))
    assert states == [
        ("STOPPED", 1, 1),
        ("STARTED", 1, 1),
        ("STARTED", 1, 1),
        ("STARTED", 3, 3),
        ("STARTED", 3, 3),
        ("STARTED", 3, 3),
        ("STOPPED", 3, 3),  # stopped keeps its last size, as together's objects do
        ("STOPPED", 3, 3),
    ]
    bill = fleet.bill(1007)
    assert [(e["minute"], e["replicas"]) for e in bill] == [
        (1001, 1),
        (1002, 1),
        (1003, 3),
        (1004, 3),
        (1005, 3),
    ]
    assert fleet.bill_pusd(1007) == 11 * 54_200_000_000
    assert bill[0]["minute_start_us"] == 1_001_000_000 and bill[0]["cents_per_minute"] == "5.42"
    with pytest.raises(ValueError):
        fleet.add(MODEL, "8x_unknown")
    with pytest.raises(ValueError):
        fleet.add(MODEL, A100, [(0, -1)])


async def test_routes_answer_in_togethers_v1_shapes(sim: RunningSimulator) -> None:
    """GET /v1/endpoints?type=dedicated lists ListEndpoints, GET /v1/endpoints/{id} the
    DedicatedEndpoint; an unknown id is 404; no key is 401; the serverless list stays."""
    fleet = sim.app[DEDICATED]
    assert fleet.hardware["2x_nvidia_a100_80gb_sxm"] == Decimal("5.42")  # GET /v1/hardware's price
    ep = fleet.add(MODEL, A100, [(0, 2)], start_minute=fleet.minute_now())
    status, listing = await get(sim, "/v1/endpoints?type=dedicated")
    assert status == 200 and listing["object"] == "list"
    (item,) = listing["data"]
    assert set(item) == LIST_FIELDS and item["id"] == ep.id and item["type"] == "dedicated"
    status, obj = await get(sim, f"/v1/endpoints/{ep.id}")
    assert status == 200 and set(obj) == DEDICATED_FIELDS
    assert (obj["state"], obj["hardware"], obj["autoscaling"]) == (
        "STARTED",
        A100,
        {"min_replicas": 2, "max_replicas": 2},
    )
    status, everything = await get(sim, "/v1/endpoints")
    types = {e["type"] for e in everything["data"]}
    assert status == 200 and types == {"serverless", "dedicated"}
    status, serverless = await get(sim, "/v1/endpoints?type=serverless")
    assert {e["type"] for e in serverless["data"]} == {"serverless"}
    assert (await get(sim, "/v1/endpoints/endpoint-nope"))[0] == 404
    assert (await get(sim, f"/v1/endpoints/{ep.id}", headers=None))[0] == 401
    status, bill = await get(sim, "/_sim/dedicated/bill")
    assert status == 200 and bill["total_pusd"] == 2 * 54_200_000_000 and len(bill["entries"]) == 1
