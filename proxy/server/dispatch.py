"""The public listener's one entry for everything but the inference hot path.

Validate the raw target (routes.parse_target) → resolve it in the route table → authenticate →
hand it to the route kind's handler. Nothing is forwarded before all of that has passed; what
goes upstream is rebuilt from the route and validated parts (docs/security.md).
"""

from __future__ import annotations

from aiohttp import web

from proxy.core.auth import Principal
from proxy.core.routes import ROUTES, Match, Route, RouteTable, Target, check_header_values, parse_target
from proxy.errors import MeterError, NotFound, NotReady, RouteNotAllowed
from proxy.server.media import UnitRelay
from proxy.server.objects import ObjectGateway
from proxy.server.passthrough import Outbound, Passthrough, respond
from proxy.server.relay import ENDPOINTS, Relay
from proxy.server.responses import error_response
from proxy.upstream.client import FORWARDED_HEADERS

UPSTREAM_HEADERS = (*FORWARDED_HEADERS, "content-type")  # what may travel upstream


def served_families(table: RouteTable = ROUTES) -> str:
    """The route families of the table, for the 404 message: every route a tenant may call is
    under one of them (object and operator routes by their first two segments)."""
    served: dict[str, None] = {}
    granted: dict[str, None] = {}
    for route in table.routes:
        family = "/" + "/".join(route.parts[:2]) if route.kind in ("object", "operator") else route.pattern
        (granted if route.kind == "operator" else served)[family] = None
    granted = {f: None for f in granted if f not in served}
    return f"{', '.join(served)}; and, where the config grants them, {', '.join(granted)}"


KNOWN = served_families()


class Dispatcher:
    """Routes a request by the table; the inference routes also arrive here when their raw
    target is not the plain path (a query string, escapes), and are validated first."""

    def __init__(
        self,
        relay: Relay,
        objects: ObjectGateway,
        passthrough: Passthrough,
        media: UnitRelay,
        table: RouteTable = ROUTES,
    ) -> None:
        self.relay, self.objects, self.pt, self.media, self.table = relay, objects, passthrough, media, table

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            target = parse_target(request.raw_path)
            check_header_values(request.headers, UPSTREAM_HEADERS)
            match = self.table.resolve(request.method, target)
            if match is not None and match.route.kind == "inference":
                return await self.relay.handle(request, match.route.name)
            if match is not None and match.route.token:  # an upload's PUT: the token says whose
                return await self.objects.put_upload(request, match)
            if match is not None and match.route.kind == "unit":
                return await self.media.handle(request, match)
            principal = self._caller(request, target, match)
            if match is None:
                return await self._granted(request, principal, target, None)
            if match.route.kind == "catalogue":
                return await self.relay.models(request, match.upstream_path, match.upstream_query)
            if match.route.kind == "object":
                return await self.objects.handle(request, principal, match)
            return await self._granted(request, principal, target, match.route)
        except MeterError as exc:
            return error_response(exc)

    def _caller(self, request: web.Request, target: Target, match: Match | None) -> Principal:
        """The tenant, for routes that may be forwarded. A path the table does not know is 404
        before any key is looked at, unless some tenant is granted it."""
        if match is None and not self._granted_to_anyone(request.method, target):
            raise _unknown(request)
        principal = self.relay.authenticate(request)
        if not self.relay.accepting:
            raise NotReady("The proxy is shutting down; retry on another instance.")
        return principal

    def _granted_to_anyone(self, method: str, target: Target) -> bool:
        tenants = self.relay.config.tenants.values()
        return any(g.allows(method, target) for t in tenants for g in t.routes)

    async def _granted(
        self, request: web.Request, principal: Principal, target: Target, route: Route | None
    ) -> web.StreamResponse:
        """An operator route (or a path the table does not know): only if the config grants it
        to this tenant, then forwarded with a row whose cost is unknown."""
        grants = self.relay.config.tenants[principal.tenant].routes
        if not any(g.allows(request.method, target) for g in grants):
            if route is None:
                raise _unknown(request)
            raise RouteNotAllowed(
                f"{request.method} {target.path} acts on the operator's together.ai account and is "
                "not enabled for this API key; ask the operator to grant it (tenants.<name>.routes)."
            )
        name = route.name if route is not None else f"other:{request.method} {target.path}"[:200]
        body = await self.relay.read_body(request) if request.body_exists else None
        ctype = request.headers.get("Content-Type", "application/json")
        row = await self.pt.begin(request, principal, name, None, admit=True)
        try:
            out = Outbound(request.method, target.path, target.query, body, ctype)
            data = await self.pt.read(row, up := await self.pt.send(request, row, out), None)
        finally:
            await self.pt.close(row)
        return respond(up, data, row.request_id)


def _unknown(request: web.Request) -> NotFound:
    if request.path in ENDPOINTS:
        return NotFound(f"Unknown request URL: {request.method} {request.path}.")
    return NotFound(f"Unknown request URL: {request.method} {request.path}. together-meter serves {KNOWN}.")
