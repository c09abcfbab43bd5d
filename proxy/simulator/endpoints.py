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

together's v2 API (what the together SDK 3.x reads) is served too, in the SDK types' wire format
(camelCase aliases): `GET /v2/projects/{project}/endpoints[/{id}[/deployments]]` (Endpoint with
its EndpointDeploymentSummary list; EndpointDeployment with its DeploymentStatus) and
`GET /v2/public/inference-instance-types` (InferenceInstanceType, `priceCentsPerHour`). Each
endpoint has one deployment on its hardware (the instance type). There the script is what the
autoscaler wants (`desiredReplicas`); `readyReplicas` follows it `ready_lag` minutes late when
scaling up (new replicas take a while to get ready) and at once when scaling down.
`fleet.bill_v2()` bills every minute its ready replicas at the instance type's price per hour:
ready x cents_per_hour x 10**10 / 60 pico-USD, by Decimal at 60 digits, rounded half-up once per
endpoint-minute (the rule docs/estimating-costs.md states; independent of the proxy's Fractions).

TEST ONLY knobs: `clock` (seconds, default time.time) and `minute_seconds` (default 60): a test
"minute" of 1 s makes a scaling script run in seconds; minutes are cut on the epoch
(floor(clock / minute_seconds)), as the proxy's follower cuts them.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

from aiohttp import web

PUSD_PER_CENT = 10**10
PROJECT = "proj-simulator"  # the simulated account's v2 project
# instance type -> cents per replica-hour (GET /v2/public/inference-instance-types): whole cents,
# as the SDK's type says, whose per-minute price is not a whole pico-USD (x 10**10 / 60)
CENTS_PER_HOUR = {"1x_nvidia_h100_80gb_sxm": Decimal(239), "2x_nvidia_a100_80gb_sxm": Decimal(325)}
_GPUS = {"1x_nvidia_h100_80gb_sxm": (1, "H100", 80), "2x_nvidia_a100_80gb_sxm": (2, "A100", 80)}
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
    ready_lag: int = 0  # v2: minutes a new replica takes to be ready (scaling down is at once)

    def ready(self, minute: int) -> int:
        """v2 readyReplicas in `minute`: the fewest the script wanted over the last ready_lag + 1."""
        return min(self.replicas(minute - k) for k in range(self.ready_lag + 1))

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
    cents_per_hour: dict[str, Decimal] = field(default_factory=lambda: dict(CENTS_PER_HOUR))  # v2
    project: str = PROJECT

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
        ready_lag: int = 0,
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
            ready_lag=ready_lag,
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

    # -- v2 ---------------------------------------------------------------------------------

    def v2_summary(self, ep: ScriptedEndpoint, minute: int | None = None) -> dict[str, Any]:
        """The EndpointDeploymentSummary of `ep`'s one deployment (wire names) as of `minute`."""
        minute = self.minute_now() if minute is None else minute
        desired, ready = ep.replicas(minute), ep.ready(minute)
        lo, hi = ep.autoscaling or (0, max((c for _, c in ep.steps), default=1))
        state = "STOPPED" if desired == ready == 0 else "READY" if desired == ready else "SCALING"
        return {
            "id": f"dep-{ep.id[-12:]}",
            "autoscaling": {"minReplicas": lo, "maxReplicas": hi},
            "createdAt": _iso(ep.created_minute * self.minute_seconds),
            "estimatedEffectiveTrafficShare": 1.0,
            "model": f"projects/{self.project}/models/{ep.model}/revisions/1",
            "modelId": ep.model,
            "name": f"{self.project}/{ep.name.split('/')[-1]}/main",
            "state": f"DEPLOYMENT_STATE_{state}",
            "trafficMode": "TRAFFIC_MODE_LIVE",
            "desiredReplicas": desired,
            "hardware": ep.hardware,
            "readyReplicas": ready,
        }

    def v2_endpoint(self, ep: ScriptedEndpoint, minute: int | None = None) -> dict[str, Any]:
        """The v2 Endpoint object of `ep` (wire names) as of `minute`."""
        created = _iso(ep.created_minute * self.minute_seconds)
        return {
            "id": ep.id,
            "createdAt": created,
            "deployments": [self.v2_summary(ep, minute)],
            "endpointType": "ENDPOINT_TYPE_DEDICATED",
            "etag": f"etag-{ep.start_minute}",
            "name": ep.name,
            "projectId": self.project,
            "trafficSplit": [{"deploymentId": f"dep-{ep.id[-12:]}", "weight": 100}],
            "updatedAt": created,
            "visibility": "VISIBILITY_PRIVATE",
        }

    def v2_deployment(self, ep: ScriptedEndpoint, minute: int | None = None) -> dict[str, Any]:
        """The EndpointDeployment (with its DeploymentStatus) of `ep`'s one deployment."""
        summary = self.v2_summary(ep, minute)
        ready = summary.pop("readyReplicas")
        status = {"message": "simulated", "state": summary["state"], "readyReplicas": ready}
        status["scheduledReplicas"] = summary["desiredReplicas"]
        config = f"projects/{self.project}/configs/cfg-{ep.hardware}"
        return {
            **summary,
            "config": config,
            "configId": config.rsplit("/", 1)[-1],
            "endpointId": ep.id,
            "etag": f"etag-{ep.start_minute}",
            "modelRevisionId": "1",
            "projectId": self.project,
            "status": status,
            "updatedAt": summary["createdAt"],
        }

    def bill_v2(self, through_minute: int | None = None) -> list[dict[str, Any]]:
        """One entry per endpoint and minute with ready replicas, priced per replica-hour."""
        last = self.minute_now() if through_minute is None else through_minute
        out = []
        for ep in self.endpoints.values():
            cents = self.cents_per_hour[ep.hardware]
            for minute in range(ep.created_minute, last + 1):
                ready = ep.ready(minute)
                if ready == 0:
                    continue
                with localcontext() as ctx:
                    ctx.prec = 60
                    exact = Decimal(ready) * cents * PUSD_PER_CENT / 60
                    billed = exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)
                out.append(
                    {
                        "endpoint_id": ep.id,
                        "minute": minute,
                        "minute_start_us": self.minute_start_us(minute),
                        "ready_replicas": ready,
                        "instance_type": ep.hardware,
                        "cents_per_hour": str(cents),
                        "billed_pusd": int(billed),
                    }
                )
        return out

    def bill_v2_pusd(self, through_minute: int | None = None, endpoint_id: str | None = None) -> int:
        """The exact sum of the v2 bill in pico-USD (of one endpoint, if given)."""
        return sum(
            e["billed_pusd"]
            for e in self.bill_v2(through_minute)
            if endpoint_id is None or e["endpoint_id"] == endpoint_id
        )

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
        """GET /_sim/dedicated/bill[?api=v2]: every billed endpoint-minute so far and the total."""
        fleet = request.app[DEDICATED]
        entries = fleet.bill_v2() if request.query.get("api") == "v2" else fleet.bill()
        return _json({"entries": entries, "total_pusd": sum(e["billed_pusd"] for e in entries)})

    app.router.add_get("/v1/endpoints", listing)
    app.router.add_get("/v1/endpoints/{endpoint_id}", one)
    app.router.add_get("/_sim/dedicated/bill", bill)
    add_v2_routes(app)


def add_v2_routes(app: web.Application) -> None:
    """together's v2 reads of endpoints, deployments and instance types (module docstring)."""

    def found(request: web.Request) -> tuple[DedicatedFleet, ScriptedEndpoint | None, web.Response | None]:
        fleet = request.app[DEDICATED]
        if not _authorized(request):
            return fleet, None, _error(401, "Invalid API key provided.", "invalid_api_key")
        if request.match_info["project_id"] != fleet.project:
            return fleet, None, _error(404, "Project not found.", "not_found")
        endpoint_id = request.match_info.get("endpoint_id")
        ep = None if endpoint_id is None else fleet.endpoints.get(endpoint_id)
        if endpoint_id is not None and ep is None:
            return fleet, None, _error(404, "Endpoint not found.", "not_found")
        return fleet, ep, None

    async def endpoints(request: web.Request) -> web.Response:
        fleet, _, error = found(request)
        data = [fleet.v2_endpoint(ep) for ep in fleet.endpoints.values()]
        return error or _json({"data": data, "next_cursor": None})

    async def endpoint(request: web.Request) -> web.Response:
        fleet, ep, error = found(request)
        return error or _json(fleet.v2_endpoint(ep) if ep else {})

    async def deployments(request: web.Request) -> web.Response:
        fleet, ep, error = found(request)
        return error or _json({"data": [fleet.v2_deployment(ep)] if ep else [], "next_cursor": None})

    async def instance_types(request: web.Request) -> web.Response:
        fleet = request.app[DEDICATED]
        data = [
            {
                "id": type_id,
                "description": f"{_GPUS.get(type_id, (1, '?', 0))[0]}x {_GPUS.get(type_id, (1, '?', 0))[1]}",
                "gpuCount": _GPUS.get(type_id, (1, "?", 0))[0],
                "gpuMemoryGib": _GPUS.get(type_id, (1, "?", 0))[2],
                "gpuType": _GPUS.get(type_id, (1, "?", 0))[1],
                "name": type_id,
                "priceCentsPerHour": _number(cents),
                "regions": [{"name": "us-central-1"}],
            }
            for type_id, cents in fleet.cents_per_hour.items()
        ]
        return _raw_numbers({"object": "list", "data": data, "next_cursor": None})

    base = "/v2/projects/{project_id}/endpoints"
    app.router.add_get(base, endpoints)
    app.router.add_get(base + "/{endpoint_id}", endpoint)
    app.router.add_get(base + "/{endpoint_id}/deployments", deployments)
    app.router.add_get("/v2/public/inference-instance-types", instance_types)


_RAW = re.compile(r'"__decimal__([0-9.]+)"')


def _number(cents: Decimal) -> int | str:
    """An integral price as a JSON integer (the SDK's type); a decimal one is written as a JSON
    number with its exact text (a placeholder that `_raw_numbers` unquotes: no float on the way)."""
    if cents == cents.to_integral_value():
        return int(cents)
    return f"__decimal__{format(cents.normalize(), 'f')}"


def _raw_numbers(obj: Any) -> web.Response:
    body = _RAW.sub(lambda m: m.group(1), json.dumps(obj))
    return web.Response(body=body, content_type="application/json")
