"""Dedicated endpoints by the minute: a background follower records what together bills for them.

Every `dedicated.poll_seconds` it looks at each followed endpoint (`dedicated.follow`, the
`endpoint_id` of `dedicated_endpoints`, and with `dedicated.discover` every endpoint
`GET /v1/endpoints?type=dedicated` lists) with `GET /v1/endpoints/{id}` and the operator key,
prices it with `GET /v1/hardware` (cached), and hands the ledger one `EndpointMinute` per
endpoint and minute it saw (proxy/core/dedicated.py has the arithmetic and the rules).

With `dedicated.api: v2` (or a `dedicated.project_id`) it reads together's v2 API instead, as the
together SDK 3.x does: `GET /v2/projects/{project}/endpoints/{id}` (the Endpoint object, whose
`deployments` carry `readyReplicas` and the instance type `hardware`), priced by
`GET /v2/public/inference-instance-types` (`priceCentsPerHour` per replica); discovery lists
`GET /v2/projects/{project}/endpoints` (cursor pages, `endpointType: ENDPOINT_TYPE_DEDICATED`).
One request per look, so the look's round trip still names its minute.

* A look counts for a minute only if its whole round trip lies in that minute: the upstream
  answered somewhere in between, so only then is it certain which minute it describes. A look
  that straddles a boundary is repeated at once (once), else dropped.
* A minute nobody looked at (the proxy was down, the upstream did not answer) is not invented:
  it is missing from the ledger, reports count it as "not observed", and the counter
  `together_meter_dedicated_minutes_unobserved_total` says so at once.
* Idempotent across restarts and replicas: the ledger keeps one line per endpoint and minute.
* Off the request path: its own task, its own upstream requests (the shared pool), bounded in
  count (`dedicated.max_endpoints`, one retry) and in time (the upstream timeouts); cancelled at
  stop. JSON is parsed on the loop (a few KB); the ledger writes run in the ledger's own way
  (SQLite: a worker thread; PostgreSQL: the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Protocol

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.config import Config
from proxy.core.budgets import Periods
from proxy.core.dedicated import (
    DedicatedError,
    EndpointMinute,
    hardware_prices,
    instance_type_prices,
    observe,
    observe_v2,
    one_minute,
    parse_decimal_json,
    rank,
)
from proxy.core.routes import ID_RE
from proxy.errors import MeterError, UpstreamProtocolError, UpstreamTimeout
from proxy.ledger import LedgerUnavailable
from proxy.ledger.endpoint_minutes import MinuteWrite
from proxy.server.metrics import PREFIX
from proxy.upstream.client import UpstreamClient, UpstreamStreamError

log = logging.getLogger(__name__)
CONCURRENT_LOOKS = 8  # endpoints looked at at once
ATTEMPTS_PER_LOOK = 2  # a look that straddles a minute boundary is repeated once
MAX_LIST_PAGES = 20  # v2 discovery: pages of GET /v2/projects/{project}/endpoints read at most
V2_PRICES = "/v2/public/inference-instance-types"


class MinuteStore(Protocol):
    """What the follower needs from the ledger (both backends have it)."""

    async def record_endpoint_minute(self, m: EndpointMinute) -> MinuteWrite: ...


class FollowerMetrics:
    """The follower's series on /metrics (Metrics.dedicated renders them)."""

    def __init__(self) -> None:
        self.cost_pusd: dict[str, int] = {}  # endpoint -> known cost this process added to the ledger
        self.minutes: dict[str, int] = {}  # endpoint -> minutes this process recorded first
        self.unobserved: dict[str, int] = {}  # endpoint -> minutes between two looks not looked at
        self.replicas: dict[tuple[str, str], int] = {}  # (endpoint, hardware) -> last known count
        self.last_observed: dict[str, float] = {}  # endpoint -> unix time of the last recorded look
        self.failures: dict[str, int] = {}  # kind -> looks that gave no minute

    def failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(
            PREFIX + "dedicated_cost_usd",
            "Cost of dedicated endpoint-minutes recorded in the ledger by this process "
            "(running replicas x the hardware's price per minute; summed over replicas it is the ledger's).",
            labels=("endpoint",),
        )
        for endpoint, pusd in sorted(self.cost_pusd.items()):
            fam.add_metric([endpoint], pusd / 1e12)
        yield fam
        specs: tuple[tuple[str, str, dict[str, int]], ...] = (
            (
                "dedicated_minutes",
                "Endpoint-minutes this process recorded first in the ledger.",
                self.minutes,
            ),
            (
                "dedicated_minutes_unobserved",
                "Minutes between two looks at an endpoint that nobody looked at "
                "(not in the ledger, never guessed).",
                self.unobserved,
            ),
        )
        for name, doc, series in specs:
            fam = CounterMetricFamily(PREFIX + name, doc, labels=("endpoint",))
            for endpoint, n in sorted(series.items()):
                fam.add_metric([endpoint], n)
            yield fam
        fam = CounterMetricFamily(
            PREFIX + "dedicated_look_failures",
            "Looks at an endpoint that recorded no minute, by kind (upstream, malformed, ledger, straddled).",
            labels=("kind",),
        )
        for kind, n in sorted(self.failures.items()):
            fam.add_metric([kind], n)
        yield fam
        gauge = GaugeMetricFamily(
            PREFIX + "dedicated_replicas",
            "Running replicas of a dedicated endpoint at the last look (absent while unknown).",
            labels=("endpoint", "hardware"),
        )
        for (endpoint, hardware), n in sorted(self.replicas.items()):
            gauge.add_metric([endpoint, hardware], n)
        yield gauge
        gauge = GaugeMetricFamily(
            PREFIX + "dedicated_last_observed_timestamp_seconds",
            "Unix time of the last look at a dedicated endpoint that was recorded.",
            labels=("endpoint",),
        )
        for endpoint, ts in sorted(self.last_observed.items()):
            gauge.add_metric([endpoint], ts)
        yield gauge


class DedicatedFollower:
    """Background task: records each followed dedicated endpoint's running replicas per minute."""

    def __init__(
        self,
        store: MinuteStore,
        upstream: UpstreamClient,
        config: Callable[[], Config],
        periods: Periods,
        clock: Callable[[], int],
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.config = config  # a getter: the endpoints and the interval follow config reloads
        self.periods = periods
        self.clock = clock  # µs since the epoch (tests may pass another)
        self.metrics = FollowerMetrics()
        self._task: asyncio.Task[None] | None = None
        self._prices: dict[str, Decimal] = {}
        self._prices_at: int | None = None  # when the prices were last read
        self._prices_api = ""  # which API they were read from (v1: per minute, v2: per hour)
        self._asked_at: int | None = None  # when they were last asked for (read or not)
        self._discovered: tuple[str, ...] = ()
        self._written: dict[str, tuple[int, tuple[bool, int, int, int, int]]] = {}  # endpoint -> minute, rank
        self._last_minute: dict[str, int] = {}
        self._missing: set[str] = set()  # followed ids the upstream does not know (logged once)

    @property
    def enabled(self) -> bool:
        config = self.config()
        return bool(config.followed_endpoints()) or config.dedicated.discover

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dedicated-follower")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            settings = self.config().dedicated
            if self.enabled:
                try:
                    await self.poll_once()
                except Exception:  # never let one bad answer stop the follower
                    log.exception(
                        "dedicated: a look at the endpoints failed; next in %g s", settings.poll_seconds
                    )
            await asyncio.sleep(settings.poll_seconds)

    async def poll_once(self) -> list[EndpointMinute]:
        """One look at every followed endpoint; the minutes recorded (or already there)."""
        ids = await self._endpoint_ids()
        if not ids:
            return []
        prices = await self._hardware_prices()
        found: list[EndpointMinute] = []
        for i in range(0, len(ids), CONCURRENT_LOOKS):
            looks = await asyncio.gather(*(self._look(e, prices) for e in ids[i : i + CONCURRENT_LOOKS]))
            found += [m for m in looks if m is not None]
        if any(self._unpriced(m) for m in found) and self._may_refresh():
            await self._hardware_prices(refresh=True)  # a new hardware: its price for the next look
        return found

    def _unpriced(self, m: EndpointMinute) -> bool:
        """Did `m` run on a hardware (instance type) without a known price?"""
        if self.config().dedicated.api == "v2":
            return m.cost_pusd is None and m.cost_high_pusd is None and bool(m.hardware)
        return m.cents_per_minute is None and bool(m.hardware)

    def _endpoint_path(self, endpoint_id: str = "") -> str:
        settings = self.config().dedicated
        base = f"/v2/projects/{settings.project_id}/endpoints" if settings.api == "v2" else "/v1/endpoints"
        return base + (f"/{endpoint_id}" if endpoint_id else "")

    def _may_refresh(self) -> bool:
        """Ask the prices again for a hardware without one at most once a minute."""
        asked, minute = self._asked_at, self.config().dedicated.minute_us
        return asked is None or self.clock() - asked >= minute

    async def _endpoint_ids(self) -> list[str]:
        config = self.config()
        ids = list(config.followed_endpoints())
        if config.dedicated.discover:
            with contextlib.suppress(MeterError, DedicatedError):
                self._discovered = await self._discover()
            ids += [e for e in self._discovered if e not in ids]
        limit = config.dedicated.max_endpoints
        if len(ids) > limit:
            log.warning(
                "dedicated: %d endpoints, following the first %d (dedicated.max_endpoints)", len(ids), limit
            )
        return ids[:limit]

    async def _discover(self) -> tuple[str, ...]:
        if self.config().dedicated.api == "v2":
            return await self._discover_v2()
        status, data = await self._get("/v1/endpoints", "type=dedicated")
        if status != 200:
            self.metrics.failed("upstream")
            raise UpstreamProtocolError(f"GET /v1/endpoints?type=dedicated answered {status}")
        listing = _json(data)
        items = listing.get("data") if isinstance(listing, dict) else listing
        if not isinstance(items, list):
            self.metrics.failed("malformed")
            raise DedicatedError("GET /v1/endpoints answered without a data list")
        return tuple(
            item["id"]
            for item in items
            if isinstance(item, dict)
            and item.get("type", "dedicated") == "dedicated"
            and isinstance(item.get("id"), str)
            and ID_RE.match(item["id"])
        )

    async def _discover_v2(self) -> tuple[str, ...]:
        """The dedicated endpoints of the project: GET /v2/projects/{project}/endpoints, cursor
        pages (`after` = `next_cursor`), MAX_LIST_PAGES at most."""
        found: list[str] = []
        query = "limit=500"
        for _ in range(MAX_LIST_PAGES):
            status, data = await self._get(self._endpoint_path(), query)
            if status != 200:
                self.metrics.failed("upstream")
                raise UpstreamProtocolError(f"GET {self._endpoint_path()} answered {status}")
            listing = _json(data)
            items = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(items, list):
                self.metrics.failed("malformed")
                raise DedicatedError(f"GET {self._endpoint_path()} answered without a data list")
            found += [
                item["id"]
                for item in items
                if isinstance(item, dict)
                and item.get("endpointType", "ENDPOINT_TYPE_DEDICATED") == "ENDPOINT_TYPE_DEDICATED"
                and isinstance(item.get("id"), str)
                and ID_RE.match(item["id"])
            ]
            cursor = listing.get("next_cursor")
            if not isinstance(cursor, str) or not cursor or not ID_RE.match(cursor):
                break
            query = f"limit=500&after={cursor}"
        return tuple(dict.fromkeys(found))

    async def _hardware_prices(self, refresh: bool = False) -> dict[str, Decimal]:
        """hardware id -> cents per minute, from GET /v1/hardware (v2: instance type -> cents per
        replica-hour, from GET /v2/public/inference-instance-types), cached prices_refresh_seconds."""
        now = self.clock()
        settings = self.config().dedicated
        max_age = settings.prices_refresh_seconds * 1_000_000
        fresh = self._prices_at is not None and now - self._prices_at < max_age
        if not refresh and fresh and self._prices_api == settings.api:
            return self._prices
        self._asked_at = now
        v1 = settings.api == "v1"
        path, read = ("/v1/hardware", hardware_prices) if v1 else (V2_PRICES, instance_type_prices)
        if self._prices_api != settings.api:
            self._prices = {}  # never price a v2 minute with v1's per-minute prices (or back)
        try:
            status, data = await self._get(path)
            if status != 200:
                raise UpstreamProtocolError(f"GET {path} answered {status}")
            self._prices, self._prices_at = read(parse_decimal_json(data)), now
            self._prices_api = settings.api
        except (MeterError, DedicatedError) as exc:
            log.warning("dedicated: hardware prices not refreshed (%s); the last ones stay", exc)
        return self._prices

    async def _look(self, endpoint_id: str, prices: dict[str, Decimal]) -> EndpointMinute | None:
        """One look at one endpoint, recorded in the ledger; None when it recorded nothing."""
        if not ID_RE.match(endpoint_id):  # ids may come from the upstream; never trust a path part
            return None
        minute_us = self.config().dedicated.minute_us
        for _ in range(ATTEMPTS_PER_LOOK):
            sent = self.clock()
            try:
                status, data = await self._get(self._endpoint_path(endpoint_id))
            except MeterError as exc:
                self.metrics.failed("upstream")
                log.warning("dedicated: %s not looked at: %s", endpoint_id, exc)
                return None
            received = self.clock()
            minute = one_minute(sent, received, minute_us)
            if minute is not None:
                return await self._seen(endpoint_id, status, data, minute, received, prices)
        self.metrics.failed("straddled")
        return None

    async def _seen(
        self,
        endpoint_id: str,
        status: int,
        data: bytes,
        minute: int,
        observed_us: int,
        prices: dict[str, Decimal],
    ) -> EndpointMinute | None:
        if status == 404:
            if endpoint_id not in self._missing:
                log.warning("dedicated: the upstream does not know endpoint %s (deleted?)", endpoint_id)
                self._missing.add(endpoint_id)
            return None
        if status != 200:
            self.metrics.failed("upstream")
            log.warning("dedicated: GET %s answered %d", self._endpoint_path(endpoint_id), status)
            return None
        self._missing.discard(endpoint_id)
        try:
            obj = _json(data)
            if not isinstance(obj, dict) or obj.get("id") != endpoint_id:
                raise DedicatedError("the answer is not this endpoint's object")
            if self.config().dedicated.api == "v2":
                m = observe_v2(obj, prices, minute, observed_us, self.periods)
            else:
                if obj.get("type", "dedicated") != "dedicated":
                    raise DedicatedError(
                        f"a {obj.get('type')!r} endpoint, not a dedicated one: not billed by the minute"
                    )
                m = observe(obj, prices, minute, observed_us, self.periods)
        except DedicatedError as exc:
            self.metrics.failed("malformed")
            log.warning("dedicated: %s: %s", endpoint_id, exc)
            return None
        return await self._record(m)

    async def _record(self, m: EndpointMinute) -> EndpointMinute | None:
        before = self._written.get(m.endpoint_id)
        if before is not None and before[0] == m.minute_start and rank(m) <= before[1]:
            return m  # this minute is recorded at least this large already
        try:
            done = await self.store.record_endpoint_minute(m)
        except LedgerUnavailable as exc:
            self.metrics.failed("ledger")
            log.warning("dedicated: %s minute not recorded: %s", m.endpoint_id, exc)
            return None
        self._written[m.endpoint_id] = (m.minute_start, rank(m))
        self._count(m, done)
        return m

    def _count(self, m: EndpointMinute, done: MinuteWrite) -> None:
        ep, metrics = m.endpoint_id, self.metrics
        minute_us = self.config().dedicated.minute_us
        if done.inserted:
            metrics.minutes[ep] = metrics.minutes.get(ep, 0) + 1
        if done.delta_pusd:
            metrics.cost_pusd[ep] = metrics.cost_pusd.get(ep, 0) + done.delta_pusd
        last = self._last_minute.get(ep)
        if last is not None and m.minute_start > last + minute_us:
            missed = (m.minute_start - last) // minute_us - 1
            metrics.unobserved[ep] = metrics.unobserved.get(ep, 0) + missed
            log.warning("dedicated: %s: %d minute(s) not observed before this one", ep, missed)
        if last is None or m.minute_start > last:
            self._last_minute[ep] = m.minute_start
        for key in [k for k in metrics.replicas if k[0] == ep and k[1] != m.hardware]:
            del metrics.replicas[key]
        if m.replicas is None:
            metrics.replicas.pop((ep, m.hardware), None)
        else:
            metrics.replicas[(ep, m.hardware)] = m.replicas
        metrics.last_observed[ep] = m.observed_us / 1e6

    async def _get(self, path: str, query: str = "") -> tuple[int, bytes]:
        config = self.config()
        up = await self.upstream.request("GET", path, body=None, incoming={}, query=query)
        try:
            async with up, asyncio.timeout(config.upstream.idle_timeout):
                return up.status, await up.read(config.limits.max_response_bytes)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The upstream stopped sending {path}.") from exc
        except UpstreamStreamError as exc:
            raise UpstreamProtocolError(f"{path} broke off: {exc}") from exc


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise DedicatedError("the answer is not JSON") from None
