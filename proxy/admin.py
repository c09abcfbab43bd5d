"""Admin listener: /metrics, /healthz, /readyz and the operator API under /admin/.

It binds to 127.0.0.1 by default and is never served on the public port. /admin/* needs the
operator token (`Authorization: Bearer $TOGETHER_METER_ADMIN_TOKEN`); a tenant key gets 401.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import AuthenticationError, BadRequest, MeterError, NotFound
from .ledger import now_us, period_of
from .metrics import build_registry, render
from .pricing import format_usd

if TYPE_CHECKING:
    from .app import Proxy

PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(exc: MeterError) -> web.Response:
    return web.Response(body=exc.body_bytes(), status=exc.status, content_type="application/json")


def build_admin_app(proxy: Proxy) -> web.Application:
    registry = build_registry(proxy.metrics)

    def operator(request: web.Request) -> None:
        token = proxy.secrets.admin_token
        header = request.headers.get("Authorization", "")
        presented = header[7:] if header.lower().startswith("bearer ") else ""
        if not token:
            raise AuthenticationError(
                f"The admin API is disabled: set {proxy.config.admin_token_env} to enable it."
            )
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise AuthenticationError("An operator token is required for /admin.")

    async def metrics(request: web.Request) -> web.Response:
        if proxy.metrics.spend_period != period_of(now_us()):
            await proxy.refresh_spend()  # a new month began: the gauge starts from the ledger
        return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        writable = await proxy.ledger.writable()
        accepting = proxy.relay.accepting
        ready = writable and accepting
        return _json(
            {"ready": ready, "ledger_writable": writable, "accepting": accepting}, 200 if ready else 503
        )

    async def spend(request: web.Request) -> web.Response:
        try:
            operator(request)
        except MeterError as exc:
            return _error(exc)
        period = request.query.get("period") or period_of(now_us())
        if not PERIOD_RE.match(period):
            return _error(BadRequest(f"period must look like 2026-11, got {period!r}"))
        totals = await proxy.ledger.spend_by_tenant(period)
        return _json(
            {
                "period": period,
                "tenants": {t: {"spend_usd": format_usd(p)} for t, p in sorted(totals.items())},
            }
        )

    async def not_found(request: web.Request) -> web.Response:
        if request.path.startswith("/admin"):
            try:
                operator(request)
            except MeterError as exc:
                return _error(exc)
        return _error(NotFound(f"Unknown admin URL: {request.path}"))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/spend", spend)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
