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


def build_admin_app(proxy: Operated) -> web.Application:
    registry = build_registry(proxy.metrics)
    watch = UpstreamWatch(proxy.upstream)

    def operator(handler: Handler) -> Handler:
        """Only with the operator token; a tenant key (or nothing) gets 401."""

        async def guarded(request: web.Request) -> web.Response:
            token = proxy.secrets.admin_token
            header = request.headers.get("Authorization", "")
            presented = header[7:] if header.lower().startswith("bearer ") else ""
            if not token:
                return _error(
                    AuthenticationError(
                        f"The admin API is disabled: set {proxy.config.admin_token_env} to enable it."
                    )
                )
            if not hmac.compare_digest(presented.encode(), token.encode()):
                return _error(AuthenticationError("An operator token is required for /admin."))
            try:
                return await handler(request)
            except MeterError as exc:
                return _error(exc)

        return guarded

    def current_period() -> str:
        period = proxy.periods.of(proxy.clock())
        if proxy.budgets.period != period:
            proxy.budgets.roll(period)  # a new month began: spend starts at zero
        return period

    def period_param(request: web.Request) -> str:
        period = request.query.get("period") or current_period()
        if not PERIOD_RE.match(period):
            raise BadRequest(f"period must look like 2026-11, got {period!r}")
        return period

    async def metrics(request: web.Request) -> web.Response:
        current_period()
        return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
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

    async def spend(request: web.Request) -> web.Response:
        period = period_param(request)
        totals: dict[str, int] = {}
        for tenant, _, cost in await proxy.ledger.period_costs(period):
            totals[tenant] = totals.get(tenant, 0) + cost
        return _json(
            {
                "period": period,
                "tenants": {t: {"spend_usd": format_usd(p)} for t, p in sorted(totals.items())},
            }
        )

    async def budgets(request: web.Request) -> web.Response:
        """Every tenant: budget, spent, reserved, remaining, projected month end."""
        period = current_period()
        book = proxy.budgets
        now = proxy.clock() / 1e6
        snap = book.snapshot()
        tenants: dict[str, Any] = {}
        for name in sorted(proxy.config.tenants):
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
                view = budget_view(
                    budget, b_spent, reserved, projected_month_end(b_spent, period, book.periods, now)
                )
                if feature is None:
                    entry["budget"] = view
                else:
                    entry["feature_budgets"][feature] = view
            tenants[name] = entry
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

    async def tenant_usage(request: web.Request) -> web.Response:
        """One tenant's period broken down by model, feature and environment."""
        tenant = request.match_info["tenant"]
        if tenant not in proxy.config.tenants:
            raise NotFound(f"Unknown tenant {tenant!r}")
        period = period_param(request)
        rows = await proxy.ledger.usage(period, tenant)
        for r in rows:
            r["cost_usd"] = _usd(r.pop("cost_pusd"))
            r.pop("tenant", None)
        total = sum(int(r["requests"]) for r in rows)
        return _json({"tenant": tenant, "period": period, "requests": total, "breakdown": rows})

    async def report(request: web.Request) -> web.Response:
        """The month's cost report grouped by `by`, as JSON (with the forecast) or CSV."""
        q = request.query
        month = q.get("month") or current_period()
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest(f"format must be json or csv, got {fmt!r}")
        if not PERIOD_RE.match(month):
            raise BadRequest(f"month must look like 2026-11, got {month!r}")
        periods = proxy.config.budgets.periods
        tenant, by = q.get("tenant") or None, q.get("by", "model")
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

    async def estimate(request: web.Request) -> web.Response:
        """Serverless / Batch / Dedicated estimates; the body holds the CLI's parameters."""
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
                charges = await dedicated_month(params.measured_month)
                data["dedicated_measured"] = estimate_rows(charges, proxy.config.dedicated.minute_us)
        except ReportError as exc:
            raise BadRequest(str(exc)) from None
        return _json(data)

    async def dedicated_month(month: str) -> list[DedicatedCharge]:
        """Every dedicated endpoint's month: measured by the minute where followed, else configured."""
        summed = await proxy.ledger.rollups(CHARGEBACK_KEEP, RollupFilter(periods=(month,)))
        found = measured(await proxy.ledger.endpoint_minutes(month), proxy.config.dedicated.minute_us)
        config = proxy.config
        return await asyncio.to_thread(
            dedicated_charges, summed, month, config.dedicated_endpoints, found, config.prices
        )

    async def chargeback(request: web.Request) -> web.Response:
        """Each dedicated endpoint's month spread over tenants by token share (JSON or CSV)."""
        q = request.query
        month = q.get("month") or current_period()
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest(f"format must be json or csv, got {fmt!r}")
        if not PERIOD_RE.match(month):
            raise BadRequest(f"month must look like 2026-11, got {month!r}")
        found = await dedicated_month(month)
        minute_us = proxy.config.dedicated.minute_us
        views = [charge_view(dc, q.get("tenant") or None, minute_us) for dc in found]
        if fmt == "csv":
            return web.Response(text=chargeback_csv(views), content_type="text/csv")
        return _json({"period": month, "endpoints": views, "notes": CHARGEBACK_NOTES})

    async def reload(request: web.Request) -> web.Response:
        try:
            result = await proxy.reload()
        except ConfigError as exc:
            raise BadRequest(f"config reload failed, the running config stays: {exc}") from None
        return _json(result)

    async def not_found(request: web.Request) -> web.Response:
        return _error(NotFound(f"Unknown admin URL: {request.path}"))

    async def to_page(request: web.Request) -> web.Response:
        raise web.HTTPFound("/admin/")  # the page's relative URLs need the slash

    app = web.Application()
    app[WATCH_KEY] = watch
    app.cleanup_ctx.append(watch.running)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin", to_page)
    for name, serve in page_handlers().items():  # the spend page: no data, no token needed
        app.router.add_get("/admin/" + name, serve)
    app.router.add_get("/admin/spend", operator(spend))
    app.router.add_get("/admin/budgets", operator(budgets))
    app.router.add_get("/admin/tenants/{tenant}/usage", operator(tenant_usage))
    app.router.add_post("/admin/reload", operator(reload))
    app.router.add_get("/admin/report", operator(report))
    app.router.add_post("/admin/estimate", operator(estimate))
    app.router.add_get("/admin/chargeback", operator(chargeback))
    app.router.add_route("*", "/admin/{tail:.*}", operator(not_found))
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
