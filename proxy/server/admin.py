"""Admin listener: /metrics, /healthz, /readyz and the operator API under /admin/.

It binds to 127.0.0.1 by default and is never served on the public port. /admin/* needs the
operator token (`Authorization: Bearer $TOGETHER_METER_ADMIN_TOKEN`); a tenant key gets 401.
The spend page at /admin/ is static HTML + JS with no data in it, so it is served without the
token; its script asks /admin/budgets with the token the operator gives it.
/readyz is 503 while the ledger cannot be written, the proxy is shutting down, or the upstream
cannot be reached: probed with a TCP connect at start and every 10 s, so an unresolvable or
refusing upstream shows before any request has failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.core.budgets import Budget, projected_month_end
from proxy.core.chargeback import CHARGEBACK_KEEP, CHARGEBACK_NOTES, chargeback_csv
from proxy.core.dedicated import (
    DedicatedCharge,
    charge_view,
    dedicated_charges,
    estimate_rows,
    measured,
    measured_view,
)
from proxy.core.estimate import (
    ESTIMATE_KEEP,
    estimate_filter,
    estimate_view,
    params_from_mapping,
    plan_estimates,
)
from proxy.core.pricing import format_usd
from proxy.core.report import (
    FORECAST_KEEP,
    ReportError,
    build_report,
    check_report,
    forecast,
    report_csv,
    report_keep,
    report_view,
)
from proxy.core.rollups import Rollup, RollupFilter
from proxy.errors import AuthenticationError, BadRequest, ConfigError, MeterError, NotFound
from proxy.server.metrics import build_registry, render
from proxy.server.state import Operated
from proxy.upstream.hosts import Upstreams

PROBE_EVERY = 10.0  # seconds between two connect probes of the upstream for /readyz
PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
Handler = Callable[[web.Request], Awaitable[web.Response]]
Snapshot = dict[tuple[str, str | None], tuple[Budget, int, int]]  # BudgetBook.snapshot()
# the spend page's files in proxy/static, by the name they are served under in /admin/
PAGE_FILES = {
    "": ("admin.html", "text/html"),
    "admin.js": ("admin.js", "text/javascript"),
    "admin.css": ("admin.css", "text/css"),
}
PAGE_HEADERS = {
    # the page talks only to this listener and loads nothing from anywhere else
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(exc: MeterError) -> web.Response:
    return web.Response(body=exc.body_bytes(), status=exc.status, content_type="application/json")


def _usd(pusd: int | None) -> str | None:
    return None if pusd is None else format_usd(pusd)


def budget_view(budget: Budget, spent: int, reserved: int, period_projection: int) -> dict[str, Any]:
    """One budget as the admin API shows it (money as exact decimal strings)."""
    return {
        "budget_usd": format_usd(budget.monthly_pusd),
        "hard_limit": budget.hard_limit,
        "alert_at": [float(t) for t in budget.alert_at],
        "spent_usd": format_usd(spent),
        "reserved_usd": format_usd(reserved),
        "remaining_usd": format_usd(budget.monthly_pusd - spent - reserved),
        "used_ratio": float(spent / budget.monthly_pusd) if budget.monthly_pusd else None,
        "projected_month_end_usd": format_usd(period_projection),
    }


class UpstreamWatch:
    """Readiness's view of the upstream: a TCP connect probe (nothing sent, nothing billed) at
    start and every PROBE_EVERY seconds, and the client's count of failed requests."""

    def __init__(self, upstream: Upstreams) -> None:
        self.upstream = upstream
        self.connectable: bool | None = None  # None: not probed yet

    @property
    def reachable(self) -> bool:
        return self.connectable is True and self.upstream.reachable

    async def check(self) -> bool:
        """Probe now (at most PROBE_TIMEOUT); True when a connection could be opened."""
        self.connectable = await self.upstream.probe()
        return self.connectable

    async def _probe_periodically(self) -> None:
        while True:  # ends when the admin app stops (cancelled by `running`)
            await self.check()
            await asyncio.sleep(PROBE_EVERY)

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """The admin app's cleanup context: probes while the listener runs."""
        task = asyncio.get_running_loop().create_task(self._probe_periodically())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


WATCH_KEY: web.AppKey[UpstreamWatch] = web.AppKey("upstream_watch", UpstreamWatch)


def page_handlers() -> dict[str, Handler]:
    """Handlers serving the spend page's static files (read once, when the app is built)."""
    static = files("proxy") / "static"
    handlers: dict[str, Handler] = {}
    for name, (filename, content_type) in PAGE_FILES.items():
        body = (static / filename).read_bytes()

        async def serve(
            request: web.Request, body: bytes = body, content_type: str = content_type
        ) -> web.Response:
            return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)

        handlers[name] = serve
    return handlers


def _month_and_format(request: web.Request, current: str) -> tuple[str, str]:
    """`month` (default: the current period) and `format` (json|csv) of a report-like query."""
    month = request.query.get("month") or current
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest(f"format must be json or csv, got {fmt!r}")
    if not PERIOD_RE.match(month):
        raise BadRequest(f"month must look like 2026-11, got {month!r}")
    return month, fmt


class AdminAPI:
    """The admin listener's handlers, one method each; `build_admin_app` routes to them."""

    def __init__(self, proxy: Operated) -> None:
        self.proxy = proxy
        self.registry = build_registry(proxy.metrics)
        self.watch = UpstreamWatch(proxy.upstream)

    # -- the operator's token, periods ---------------------------------------------------------

    def operator(self, handler: Handler) -> Handler:
        """Only with the operator token; a tenant key (or nothing) gets 401."""

        async def guarded(request: web.Request) -> web.Response:
            refused = self._refused(request)
            if refused is not None:
                return _error(refused)
            try:
                return await handler(request)
            except MeterError as exc:
                return _error(exc)

        return guarded

    def _refused(self, request: web.Request) -> AuthenticationError | None:
        token = self.proxy.secrets.admin_token
        header = request.headers.get("Authorization", "")
        presented = header[7:] if header.lower().startswith("bearer ") else ""
        if not token:
            env = self.proxy.config.admin_token_env
            return AuthenticationError(f"The admin API is disabled: set {env} to enable it.")
        if not hmac.compare_digest(presented.encode(), token.encode()):
            return AuthenticationError("An operator token is required for /admin.")
        return None

    def current_period(self) -> str:
        proxy = self.proxy
        period = proxy.periods.of(proxy.clock())
        if proxy.budgets.period != period:
            proxy.budgets.roll(period)  # a new month began: spend starts at zero
        return period

    def period_param(self, request: web.Request) -> str:
        period = request.query.get("period") or self.current_period()
        if not PERIOD_RE.match(period):
            raise BadRequest(f"period must look like 2026-11, got {period!r}")
        return period

    # -- open to the listener: metrics, health, readiness --------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        self.current_period()
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        proxy, watch = self.proxy, self.watch
        writable = await proxy.ledger.writable()
        accepting = proxy.relay.accepting
        # not probed yet, refused at the last probe or after repeated request failures: probe
        # now, so readiness also recovers without traffic
        reachable = watch.reachable or await watch.check()
        # `serve --workers N`: every worker must be ready too (each checks its ledger and upstream)
        workers_ready, workers = proxy.fleet.readiness() if proxy.fleet is not None else (True, None)
        ready = writable and accepting and reachable and workers_ready
        body: dict[str, Any] = {
            "ready": ready,
            "ledger_writable": writable,
            "accepting": accepting,
            "upstream_reachable": reachable,
        }
        if workers is not None:
            body["workers"] = workers
        if not ready:
            reasons = (
                (not writable, "the ledger is not writable"),
                (not accepting, "shutting down"),
                (not reachable, "the upstream cannot be reached"),
                (not workers_ready, "not every worker is ready"),
            )
            body["reason"] = "; ".join(text for failed, text in reasons if failed)
        return _json(body, 200 if ready else 503)

    async def not_found(self, request: web.Request) -> web.Response:
        return _error(NotFound(f"Unknown admin URL: {request.path}"))

    async def to_page(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/admin/")  # the page's relative URLs need the slash

    # -- the operator API: spend and budgets ----------------------------------------------------

    async def spend(self, request: web.Request) -> web.Response:
        period = self.period_param(request)
        totals: dict[str, int] = {}
        for tenant, _, cost in await self.proxy.ledger.period_costs(period):
            totals[tenant] = totals.get(tenant, 0) + cost
        return _json(
            {
                "period": period,
                "tenants": {t: {"spend_usd": format_usd(p)} for t, p in sorted(totals.items())},
            }
        )

    async def budgets(self, request: web.Request) -> web.Response:
        """Every tenant: budget, spent, reserved, remaining, projected month end."""
        period = self.current_period()
        book, now = self.proxy.budgets, self.proxy.clock() / 1e6
        snap = book.snapshot()
        tenants = {t: self._tenant_budgets(t, period, now, snap) for t in sorted(self.proxy.config.tenants)}
        start, end = book.periods.bounds(period)
        return _json(
            {
                "period": period,
                "timezone": book.periods.timezone,
                "period_start": start,
                "period_end": end,
                "projection": "linear: spend so far / elapsed share of the period",
                "tenants": tenants,
            }
        )

    def _tenant_budgets(self, name: str, period: str, now: float, snap: Snapshot) -> dict[str, Any]:
        """One tenant's spend and its budgets (tenant-wide and per feature) in `period`."""
        book = self.proxy.budgets
        spent = book.spent_all.get(name, 0)
        entry: dict[str, Any] = {
            "spent_usd": format_usd(spent),
            "projected_month_end_usd": format_usd(projected_month_end(spent, period, book.periods, now)),
            "budget": None,
            "feature_budgets": {},
        }
        for (tenant, feature), (budget, b_spent, reserved) in snap.items():
            if tenant != name:
                continue
            projected = projected_month_end(b_spent, period, book.periods, now)
            view = budget_view(budget, b_spent, reserved, projected)
            if feature is None:
                entry["budget"] = view
            else:
                entry["feature_budgets"][feature] = view
        return entry

    async def tenant_usage(self, request: web.Request) -> web.Response:
        """One tenant's period broken down by model, feature and environment."""
        tenant = request.match_info["tenant"]
        if tenant not in self.proxy.config.tenants:
            raise NotFound(f"Unknown tenant {tenant!r}")
        period = self.period_param(request)
        rows = await self.proxy.ledger.usage(period, tenant)
        for r in rows:
            r["cost_usd"] = _usd(r.pop("cost_pusd"))
            r.pop("tenant", None)
        total = sum(int(r["requests"]) for r in rows)
        return _json({"tenant": tenant, "period": period, "requests": total, "breakdown": rows})

    # -- the operator API: reports, estimates, chargeback, reload ------------------------------

    async def report(self, request: web.Request) -> web.Response:
        """The month's cost report grouped by `by`, as JSON (with the forecast) or CSV."""
        proxy = self.proxy
        month, fmt = _month_and_format(request, self.current_period())
        periods = proxy.config.budgets.periods
        tenant, by = request.query.get("tenant") or None, request.query.get("by", "model")
        try:
            check_report(month, by)
        except ReportError as exc:
            raise BadRequest(str(exc)) from None
        # the rollups, summed in the database (SQLite: in a worker thread), then the arithmetic
        # in a worker thread too: the serving loop only waits
        where = RollupFilter(periods=(month,), tenant=tenant)
        summed = await proxy.ledger.rollups(report_keep(by), where)
        prices, now = proxy.config.prices, proxy.clock() / 1e6
        built = await asyncio.to_thread(build_report, (), month, by, tenant, periods, summed, prices=prices)
        if fmt == "csv":
            return web.Response(text=await asyncio.to_thread(report_csv, built), content_type="text/csv")
        spent = await proxy.ledger.rollups(FORECAST_KEEP, where)
        minute_us = proxy.config.dedicated.minute_us
        found = measured(await proxy.ledger.endpoint_minutes(month), minute_us)

        def view() -> bytes:
            data = report_view(built, forecast((), month, now, periods, tenant, spent))
            data["dedicated"] = [measured_view(m, minute_us) for m in found]
            return orjson.dumps(data)

        return web.Response(body=await asyncio.to_thread(view), content_type="application/json")

    async def estimate(self, request: web.Request) -> web.Response:
        """Serverless / Batch / Dedicated estimates; the body holds the CLI's parameters."""
        proxy = self.proxy
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise BadRequest("the body must be a JSON object") from None
        try:
            params = params_from_mapping(body)
            now, periods = proxy.clock(), proxy.config.budgets.periods
            summed: list[Rollup] = []
            if params.from_ledger:
                where = estimate_filter(params, now, periods)
                summed = await proxy.ledger.rollups(ESTIMATE_KEEP, where)
            found = (
                plan_estimates(proxy.config.prices, params, (), now, periods, summed)
                if params.wants_traffic
                else []
            )
            data: dict[str, Any] = {"estimates": [estimate_view(e) for e in found]}
            if params.measured_month:
                if not PERIOD_RE.match(params.measured_month):
                    raise ReportError(f"measured_month must look like 2026-11, got {params.measured_month!r}")
                charges = await self.dedicated_month(params.measured_month)
                data["dedicated_measured"] = estimate_rows(charges, proxy.config.dedicated.minute_us)
        except ReportError as exc:
            raise BadRequest(str(exc)) from None
        return _json(data)

    async def dedicated_month(self, month: str) -> list[DedicatedCharge]:
        """Every dedicated endpoint's month: measured by the minute where followed, else configured."""
        proxy = self.proxy
        summed = await proxy.ledger.rollups(CHARGEBACK_KEEP, RollupFilter(periods=(month,)))
        found = measured(await proxy.ledger.endpoint_minutes(month), proxy.config.dedicated.minute_us)
        config = proxy.config
        return await asyncio.to_thread(
            dedicated_charges, summed, month, config.dedicated_endpoints, found, config.prices
        )

    async def chargeback(self, request: web.Request) -> web.Response:
        """Each dedicated endpoint's month spread over tenants by token share (JSON or CSV)."""
        month, fmt = _month_and_format(request, self.current_period())
        found = await self.dedicated_month(month)
        minute_us = self.proxy.config.dedicated.minute_us
        views = [charge_view(dc, request.query.get("tenant") or None, minute_us) for dc in found]
        if fmt == "csv":
            return web.Response(text=chargeback_csv(views), content_type="text/csv")
        return _json({"period": month, "endpoints": views, "notes": CHARGEBACK_NOTES})

    async def reload(self, request: web.Request) -> web.Response:
        try:
            result = await self.proxy.reload()
        except ConfigError as exc:
            raise BadRequest(f"config reload failed, the running config stays: {exc}") from None
        return _json(result)


ADMIN_KEY: web.AppKey[AdminAPI] = web.AppKey("admin_api", AdminAPI)


def build_admin_app(proxy: Operated) -> web.Application:
    """The admin listener's app: open routes first, then the operator API behind the token."""
    api = AdminAPI(proxy)
    app = web.Application()
    app[ADMIN_KEY] = api
    app[WATCH_KEY] = api.watch
    app.cleanup_ctx.append(api.watch.running)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/admin", api.to_page)
    for name, serve in page_handlers().items():  # the spend page: no data, no token needed
        app.router.add_get("/admin/" + name, serve)
    operator = api.operator
    app.router.add_get("/admin/spend", operator(api.spend))
    app.router.add_get("/admin/budgets", operator(api.budgets))
    app.router.add_get("/admin/tenants/{tenant}/usage", operator(api.tenant_usage))
    app.router.add_post("/admin/reload", operator(api.reload))
    app.router.add_get("/admin/report", operator(api.report))
    app.router.add_post("/admin/estimate", operator(api.estimate))
    app.router.add_get("/admin/chargeback", operator(api.chargeback))
    app.router.add_route("*", "/admin/{tail:.*}", operator(api.not_found))
    app.router.add_route("*", "/{tail:.*}", api.not_found)
    return app
