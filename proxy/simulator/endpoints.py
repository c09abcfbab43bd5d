"""The simulated account's dedicated endpoints: replicas that follow a script, and their bill.

`app[DEDICATED]` is a `DedicatedFleet`. A test adds endpoints to it and scripts their replica
counts per minute; the simulator answers `GET /v1/endpoints?type=dedicated` and
`GET /v1/endpoints/{id}` in together's v1 shapes (ListEndpoint, DedicatedEndpoint) and bills every
minute each endpoint runs replicas: replicas x the hardware's `cents_per_minute` (its own
arithmetic, with Decimal, independent of the proxy's), so a test compares a ledger with
`fleet.bill_pusd()` exactly. `GET /_sim/dedicated/bill` gives the bill to a test in another process.

How an endpoint looks in minute m of its script:

* replicas r > 0: `state: STARTED`, `autoscaling: {min_replicas: r, max_replicas: r}` (a fixed
  size, the way the v1 API scales an endpoint by hand); replicas 0: `state: STOPPED`;
* with `autoscaling=(lo, hi)`: STARTED with `{min_replicas: lo, max_replicas: hi}` whatever the
  script runs (lo <= r <= hi): the v1 object then does not say how many run (as together's).

TEST ONLY knobs: `clock` (seconds, default time.time) and `minute_seconds` (default 60): a test
"minute" of 1 s makes a scaling script run in seconds; minutes are cut on the epoch
(floor(clock / minute_seconds)), as the proxy's follower cuts them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from aiohttp import web

PUSD_PER_CENT = 10**10
Handler = Callable[[web.Request], Awaitable[web.Response]]


@dataclass
class ScriptedEndpoint:
    """One dedicated endpoint whose running replicas follow `steps` from `start_minute` on."""

    id: str
    model: str
    hardware: str
    created_minute: int
    start_minute: int  # the script's minute 0 (an absolute minute index)
    steps: tuple[tuple[int, int], ...] = ()  # (minute offset, replicas from then on)
    autoscaling: tuple[int, int] | None = None  # report this range instead of the running count
    name: str = ""
    display_name: str = ""

    def replicas(self, minute: int) -> int:
        """Running replicas in absolute minute `minute` (0 before the script starts)."""
        running = 0
        for offset, count in self.steps:
            if minute - self.start_minute >= offset:
                running = count
        return running

    def last_size(self, minute: int) -> int:
        """The last fixed size reported (a stopped endpoint keeps its autoscaling settings)."""
        size = 1
        for offset, count in self.steps:
            if minute - self.start_minute >= offset and count > 0:
                size = count
        return size


@dataclass
class DedicatedFleet:
    """The simulated account's dedicated endpoints (see the module docstring)."""

    hardware: dict[str, Decimal] = field(default_factory=dict)  # id -> cents per minute
    clock: Callable[[], float] = time.time  # TEST ONLY: seconds since the epoch
    minute_seconds: float = 60.0  # TEST ONLY: the length of a billed minute
    endpoints: dict[str, ScriptedEndpoint] = field(default_factory=dict)

    def minute_now(self) -> int:
        return math.floor(self.clock() / self.minute_seconds)

    def minute_start_us(self, minute: int) -> int:
        return round(minute * self.minute_seconds * 1_000_000)

    def add(
        self,
        model: str,
        hardware: str,
        steps: Iterable[tuple[int, int]] = (),
        *,
        endpoint_id: str | None = None,
        start_minute: int | None = None,
        autoscaling: tuple[int, int] | None = None,
    ) -> ScriptedEndpoint:
        """A new endpoint (STOPPED until its script runs replicas); the script starts at the next
        minute unless `start_minute` says otherwise."""
        if hardware not in self.hardware:
            raise ValueError(f"unknown hardware {hardware!r} (known: {sorted(self.hardware)})")
        now = self.minute_now()
        ep_id = endpoint_id or f"endpoint-{uuid.uuid4()}"
        ep = ScriptedEndpoint(
            ep_id,
            model,
            hardware,
            created_minute=now,
            start_minute=now + 1 if start_minute is None else start_minute,
            steps=_steps(steps),
            autoscaling=autoscaling,
            name=f"simulator/{model}-{ep_id[-8:]}",
            display_name=f"Simulated {model}",
        )
        self.endpoints[ep_id] = ep
        return ep

    def script(
        self, endpoint_id: str, steps: Iterable[tuple[int, int]], start_minute: int | None = None
    ) -> None:
        """Replace an endpoint's script (it starts at the next minute unless told otherwise)."""
        ep = self.endpoints[endpoint_id]
        ep.steps = _steps(steps)
        ep.start_minute = self.minute_now() + 1 if start_minute is None else start_minute

    def object(self, ep: ScriptedEndpoint, minute: int | None = None) -> dict[str, Any]:
        """The v1 DedicatedEndpoint object of `ep` as of `minute` (default: now)."""
        minute = self.minute_now() if minute is None else minute
        running = ep.replicas(minute)
        if ep.autoscaling is not None:
            lo, hi = ep.autoscaling
        else:
            lo = hi = running or ep.last_size(minute)
        return {
            "object": "endpoint",
            "id": ep.id,
            "name": ep.name,
            "display_name": ep.display_name,
            "model": ep.model,
            "hardware": ep.hardware,
            "type": "dedicated",
            "owner": "simulator",
            "state": "STARTED" if running > 0 else "STOPPED",
            "autoscaling": {"min_replicas": lo, "max_replicas": hi},
            "created_at": _iso(ep.created_minute * self.minute_seconds),
        }

    def bill(self, through_minute: int | None = None) -> list[dict[str, Any]]:
        """One entry per endpoint and minute that ran replicas, from its creation through
        `through_minute` (default: the current minute, billed whole)."""
        last = self.minute_now() if through_minute is None else through_minute
        out = []
        for ep in self.endpoints.values():
            cents = self.hardware[ep.hardware]
            for minute in range(ep.created_minute, last + 1):
                running = ep.replicas(minute)
                if running == 0:
                    continue
                billed = (Decimal(running) * cents * PUSD_PER_CENT).quantize(
                    Decimal(1), rounding=ROUND_HALF_UP
                )
                out.append(
                    {
                        "endpoint_id": ep.id,
                        "minute": minute,
                        "minute_start_us": self.minute_start_us(minute),
                        "replicas": running,
                        "hardware": ep.hardware,
                        "cents_per_minute": str(cents),
                        "billed_pusd": int(billed),
                    }
                )
        return out

    def bill_pusd(self, through_minute: int | None = None, endpoint_id: str | None = None) -> int:
        """The exact sum of the bill in pico-USD (of one endpoint, if given)."""
        return sum(
            e["billed_pusd"]
            for e in self.bill(through_minute)
            if endpoint_id is None or e["endpoint_id"] == endpoint_id
        )


def _steps(steps: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out = tuple(sorted((int(offset), int(count)) for offset, count in steps))
    if any(count < 0 for _, count in out):
        raise ValueError("replica counts must be >= 0")
    return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


DEDICATED: web.AppKey[DedicatedFleet] = web.AppKey("dedicated", DedicatedFleet)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str, code: str) -> web.Response:
    return _json({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status)


def _authorized(request: web.Request) -> bool:
    return request.headers.get("Authorization", "")[:7].lower() == "bearer "


def add_routes(app: web.Application, hardware: Sequence[tuple[Any, ...]], serverless: Handler) -> None:
    """GET /v1/endpoints (the serverless list from `serverless`, plus the dedicated ones),
    GET /v1/endpoints/{id}, GET /_sim/dedicated/bill; `app[DEDICATED]` priced by `hardware`
    (GET /v1/hardware's rows: id first, cents per minute last)."""
    app[DEDICATED] = DedicatedFleet({row[0]: Decimal(repr(row[-1])) for row in hardware})

    async def listing(request: web.Request) -> web.Response:
        """GET /v1/endpoints[?type=]: ListEndpoint objects, serverless and dedicated."""
        if not _authorized(request):
            return _error(401, "Invalid API key provided.", "invalid_api_key")
        kind = request.query.get("type")
        data: list[dict[str, Any]] = []
        if kind in (None, "serverless"):
            answer = await serverless(request)
            assert isinstance(answer.body, bytes)
            data += json.loads(answer.body)["data"]
        if kind in (None, "dedicated"):
            fleet = request.app[DEDICATED]
            for ep in fleet.endpoints.values():
                obj = fleet.object(ep)
                data.append({k: obj[k] for k in ("object", "id", "name", "model", "type", "owner", "state")})
                data[-1]["created_at"] = obj["created_at"]
        return _json({"object": "list", "data": data})

    async def one(request: web.Request) -> web.Response:
        """GET /v1/endpoints/{id}: the DedicatedEndpoint object, 404 for an unknown id."""
        if not _authorized(request):
            return _error(401, "Invalid API key provided.", "invalid_api_key")
        fleet = request.app[DEDICATED]
        ep = fleet.endpoints.get(request.match_info["endpoint_id"])
        if ep is None:
            return _error(404, "Endpoint not found.", "not_found")
        return _json(fleet.object(ep))

    async def bill(request: web.Request) -> web.Response:
        """GET /_sim/dedicated/bill: every billed endpoint-minute so far and the total."""
        fleet = request.app[DEDICATED]
        entries = fleet.bill()
        return _json({"entries": entries, "total_pusd": sum(e["billed_pusd"] for e in entries)})

    app.router.add_get("/v1/endpoints", listing)
    app.router.add_get("/v1/endpoints/{endpoint_id}", one)
    app.router.add_get("/_sim/dedicated/bill", bill)
