"""Forward a non-inference call on a tenant's behalf, with exactly one ledger row.

Files, batches and granted operator routes are not priced from a `usage`, but each one is sent
with the operator's key, so each gets a row naming the tenant and the route (docs/security.md):
begun `in_flight` before anything is forwarded, made terminal before the client sees the end of
the answer. `cost` is 0 where together bills nothing for the call itself (file uploads, batch
creation, object reads), None (unknown) for operator routes such as fine-tunes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web

from proxy.core.auth import Principal
from proxy.core.budgets import BudgetExceeded
from proxy.core.calls import header_attribution, new_request_id
from proxy.core.pricing import SERVERLESS
from proxy.core.ratelimits import RATE_LIMIT_HEADERS
from proxy.errors import MeterError, NotReady, UpstreamTimeout
from proxy.ledger import LedgerRow, LedgerUnavailable, now_us
from proxy.server.relay import Relay
from proxy.server.responses import JSON_CT
from proxy.upstream.client import UpstreamResponse, UpstreamStreamError

log = logging.getLogger(__name__)
# answer headers a client may need besides the body: together's rate-limit headers and retries
PASSED_HEADERS = (*RATE_LIMIT_HEADERS, "content-disposition")


@dataclass(frozen=True, slots=True)
class Outbound:
    """What to send upstream: every part already validated (routes.parse_target, ids)."""

    method: str
    path: str
    query: str = ""
    body: bytes | None = None
    content_type: str = JSON_CT


class Passthrough:
    """Sends one call upstream for a tenant and keeps its row; see the module docstring."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._open: set[str] = set()  # request ids begun and not yet made terminal

    async def begin(
        self,
        request: web.Request,
        principal: Principal,
        endpoint: str,
        cost: int | None,
        *,
        admit: bool = False,
    ) -> LedgerRow:
        """Commit the in-flight row (an exhausted budget refuses creating calls when `admit`)."""
        relay = self.relay
        feature, environment = header_attribution(request.headers)
        started = relay.clock()
        row = LedgerRow(
            new_request_id(),
            principal.tenant,
            principal.key_id,
            "",
            endpoint,
            SERVERLESS,
            feature,
            environment,
            False,
            started,
            relay.period(started),
            reserved_pusd=0 if cost == 0 else None,
        )
        if admit:
            try:
                relay.budgets.admit(principal.tenant, feature, row.period, 0)
            except BudgetExceeded as exc:
                await self.reject(row, exc)
                raise
        try:
            await relay.ledger.begin(row)
        except BudgetExceeded as exc:
            await self.reject(row, exc)
            raise
        except LedgerUnavailable:
            raise NotReady("The ledger is not writable; nothing was forwarded.") from None
        self._open.add(row.request_id)
        return row

    async def close(self, row: LedgerRow) -> None:
        """Last resort (cancelled at shutdown, a bug): a row still open is made terminal at its
        reservation (0 or unknown), so every forwarded call keeps exactly one terminal row."""
        if row.request_id in self._open:
            await asyncio.shield(self.finish(row, "shutdown_aborted", None, row.reserved_pusd, "aborted"))

    async def reject(self, row: LedgerRow, exc: MeterError) -> None:
        """A refused call: a `rejected` row, nothing forwarded."""
        final = replace(row, status="rejected", finished_us=now_us(), error_code=exc.code, cost_pusd=0)
        with contextlib.suppress(LedgerUnavailable):
            await self.relay.ledger.record(final)

    async def send(self, request: web.Request, row: LedgerRow, out: Outbound) -> UpstreamResponse:
        """Forward; a failure before the answer finishes the row and raises the MeterError."""
        try:
            return await self.relay.upstream.request(
                out.method,
                out.path,
                body=out.body,
                incoming=request.headers,
                query=out.query,
                content_type=out.content_type,
            )
        except MeterError as exc:
            billed = isinstance(exc, UpstreamTimeout) and exc.sent  # it may have run the call
            status = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"
            cost = row.reserved_pusd if billed else 0
            await self.finish(row, status, None, cost, exc.code)
            raise

    async def finish(
        self, row: LedgerRow, status: str, upstream_status: int | None, cost: int | None, code: str | None
    ) -> None:
        if row.request_id not in self._open:
            return
        self._open.discard(row.request_id)
        final = row.terminal(status, upstream_status=upstream_status, cost_pusd=cost, error_code=code)
        try:
            await self.relay.ledger.finish(final)
        except LedgerUnavailable:
            log.error(
                "ledger: could not record %s %s; the reaper will settle it", row.endpoint, row.request_id
            )

    async def settle(self, row: LedgerRow, up: UpstreamResponse, cost: int | None) -> None:
        """The answer is read: ok (at `cost`) on 2xx, else an upstream error billed nothing."""
        if 200 <= up.status < 300:
            await self.finish(row, "ok", up.status, cost, None)
        else:
            await self.finish(row, "upstream_error", up.status, 0, f"upstream_{up.status}")

    async def read(
        self, row: LedgerRow, up: UpstreamResponse, cost: int | None, *, settle: bool = True
    ) -> bytes:
        """The whole answer, its row settled (unless `settle` is False: the caller finishes it);
        a broken answer finishes the row and raises."""
        try:
            async with up:
                data = await self.relay.read_upstream(up)
        except MeterError as exc:
            status = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_aborted"
            await self.finish(row, status, up.status, cost if up.status < 300 else 0, exc.code)
            raise
        if settle:
            await self.settle(row, up, cost)
        return data

    async def relay_body(
        self, request: web.Request, row: LedgerRow, up: UpstreamResponse, cost: int | None
    ) -> web.StreamResponse:
        """Chunks as they arrive (a batch output file can be far larger than a chat answer);
        the row commits before the end of the body is written."""
        resp = web.StreamResponse(status=up.status, headers=answer_headers(up.headers, row.request_id))
        resp.content_type = up.content_type or JSON_CT
        async with up:
            await resp.prepare(request)
            try:
                while True:
                    async with asyncio.timeout(self.relay.config.upstream.idle_timeout):
                        chunk = await up.readany()
                    if not chunk:
                        break
                    await resp.write(chunk)
            except (TimeoutError, UpstreamStreamError, ConnectionError, aiohttp.ClientConnectionResetError):
                await self.finish(row, "upstream_aborted", up.status, cost, "body_broken")
                if request.transport is not None:  # cut, so the client cannot take it for the whole
                    request.transport.close()
                return resp
        await self.settle(row, up, cost)
        await resp.write_eof()
        return resp


def answer_headers(upstream: Mapping[str, str], request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    for name in PASSED_HEADERS:
        value = upstream.get(name)
        if value is not None:
            headers[name] = value
    return headers


def respond(up: UpstreamResponse, data: bytes, request_id: str) -> web.Response:
    """The upstream's answer as it came (status, body, type and the passed headers)."""
    return web.Response(
        body=data,
        status=up.status,
        headers=answer_headers(up.headers, request_id),
        content_type=up.content_type or JSON_CT,
    )
