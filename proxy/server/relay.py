"""The hot path: authenticate -> admit -> forward -> relay -> meter -> record.

`Relay.handle` reads top to bottom; each step is a named call. Every admitted request gets a
ledger row committed as `in_flight` before it is forwarded and made terminal exactly once,
before the client sees the end of its response (the JSON body, or `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.config import Config
from proxy.core.auth import FailureLimiter, KeyStore, Principal
from proxy.core.budgets import BudgetBook, BudgetExceeded
from proxy.core.calls import INPUT_ONLY, Call, attribution, new_request_id, parse_call
from proxy.core.cost_body import body_with_cost
from proxy.core.pricing import SERVERLESS, Rates
from proxy.core.ratelimits import passed
from proxy.core.routes import ROUTES, check_header_values
from proxy.core.shapes import embeddings_as_base64, openai_list, wants_openai_list
from proxy.core.usage import Tokenizer, Usage, completion_text, estimate_prompt_tokens, usage_from_json
from proxy.errors import (
    AuthenticationError,
    BodyTimeout,
    BodyTooLarge,
    InvalidField,
    MeterError,
    ModelNotAllowed,
    ModelNotPriced,
    NotReady,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.ledger import Ledger, LedgerRow, LedgerUnavailable, now_us
from proxy.server.metrics import Metrics
from proxy.server.recorder import Recorder, Sinks
from proxy.server.responses import JSON_CT, client_gone, error_response
from proxy.server.stream_relay import StreamRelay
from proxy.server.tokens import loaded
from proxy.upstream.client import FORWARDED_HEADERS, UpstreamResponse, UpstreamStreamError
from proxy.upstream.hosts import Upstreams

log = logging.getLogger(__name__)

# path -> ledger endpoint of the metered inference routes (routes.py holds the whole table)
ENDPOINTS = {r.pattern: r.name for r in ROUTES.routes if r.kind == "inference"}
PATHS = {name: path for path, name in ENDPOINTS.items()}
COST_OPTIONS = ("usage", "none")  # X-Meter-Cost
__all__ = ["ENDPOINTS", "JSON_CT", "PATHS", "Relay", "error_response", "new_request_id"]


class Relay:
    """Owns the request path; built once per app by `create_app`."""

    def __init__(
        self,
        config: Config,
        keys: KeyStore,
        upstream: Upstreams,
        ledger: Ledger,
        metrics: Metrics,
        tokenizer: Tokenizer,
        budgets: BudgetBook | None = None,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self.config = config
        self.keys = keys
        self.upstream = upstream
        self.ledger = ledger
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.budgets = budgets or BudgetBook({}, config.budgets.periods)
        self.accepting = True
        # the serving loop (set by Proxy.start): on Python 3.11 asyncio.get_running_loop() and
        # current_task() are a getpid() system call each, several per request otherwise
        self.loop: asyncio.AbstractEventLoop | None = None
        self._admitted: set[asyncio.Task[Any]] = set()  # handlers `abort_in_flight` may stop
        self.clock = clock  # µs since the epoch; injectable so tests can cross a month boundary
        self._period_cache = (-1, "")
        self.auth_failures = FailureLimiter(config.limits.auth_failures_per_minute)
        self.sinks = Sinks(ledger, metrics, self.budgets)
        self.streams = StreamRelay(lambda: self.config, metrics, tokenizer)

    def reconfigure(self, config: Config, keys: KeyStore) -> None:
        """A reloaded config: new keys, tenants and prices for the requests that follow."""
        self.config, self.keys = config, keys

    def abort_in_flight(self) -> int:
        """The drain timeout ran out: stop every admitted request still running (shutdown).

        Streams end with an SSE error event and a `shutdown_aborted` row; see `_relay_events`.
        """
        tasks = [t for t in self._admitted if not t.done()]
        for task in tasks:
            task.cancel("shutdown")
        return len(tasks)

    def period(self, ts_us: int) -> str:
        """The budget period a request started in (cached per second: it is on the hot path)."""
        second = ts_us // 1_000_000
        if second != self._period_cache[0]:
            self._period_cache = (second, self.budgets.periods.of(ts_us))
        return self._period_cache[1]

    # -- the request path ------------------------------------------------------------------

    async def handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        """One metered inference call; `endpoint` is its route's name (chat, completions, ...)."""
        t0 = time.perf_counter()
        request_id = new_request_id()
        try:
            principal = self.authenticate(request)
            if not self.accepting:
                raise NotReady("The proxy is shutting down; retry on another instance.")
            check_header_values(request.headers, FORWARDED_HEADERS)  # they travel upstream
            cost_in_body = self._cost_in_body(request, principal)
        except MeterError as exc:
            return error_response(exc, request_id)
        admitted = await self._admit(request, principal, endpoint, request_id)
        if not isinstance(admitted, tuple):  # (not web.Response: an ABC check per request)
            return admitted
        call, rates, row = admitted
        self.metrics.overhead.observe((endpoint,), time.perf_counter() - t0)
        meter = Recorder(self.sinks, row, rates, t0, call.body.get("n") or 1, self.loop)
        meter.cost_in_body = cost_in_body
        return await self._run(request, call, meter)

    def _cost_in_body(self, request: web.Request, principal: Principal) -> bool:
        """`X-Meter-Cost: usage` (or `none`) per request, else the tenant's `cost_in_body`."""
        value = request.headers.get("X-Meter-Cost")
        if value is None:
            return self.config.tenants[principal.tenant].cost_in_body
        if value not in COST_OPTIONS:
            raise InvalidField("X-Meter-Cost must be 'usage' (usage.cost in the body) or 'none'.")
        return value == "usage"

    async def _admit(
        self, request: web.Request, principal: Principal, endpoint: str, request_id: str
    ) -> tuple[Call, Rates | None, LedgerRow] | web.Response:
        """Validate, check the budget and reserve, then commit the in-flight row: the request
        may be forwarded. A refusal is answered (and recorded `rejected`) here."""
        started = self.clock()
        seen: dict[str, Any] = {"model": "", "feature": None, "environment": None}
        try:
            call = parse_call(endpoint, await self.read_body(request))
            seen["model"] = call.model
            rates = self.rates_for(principal, call.model)
            seen["feature"], seen["environment"] = attribution(request.headers, call)
            reserved = self._reserve(call, rates)
            # admit: the budget check and the reservation are one synchronous step
            self.budgets.admit(principal.tenant, seen["feature"], self.period(started), reserved or 0)
        except MeterError as exc:
            await self.record_rejected(principal, request_id, endpoint, started, exc, **seen)
            return error_response(exc, request_id)
        row = LedgerRow(
            request_id,
            principal.tenant,
            principal.key_id,
            call.model,
            endpoint,
            SERVERLESS,
            seen["feature"],
            seen["environment"],
            call.stream,
            started,
            self.period(started),
            reserved_pusd=reserved,
        )
        refused = await self.begin_row(row, principal, endpoint, started, seen)
        return refused if refused is not None else (call, rates, row)

    async def begin_row(
        self, row: LedgerRow, principal: Principal, endpoint: str, started: int, seen: dict[str, Any]
    ) -> web.Response | None:
        """Commit an admitted request's in-flight row; the refusal to answer if it cannot be."""
        reserved = row.reserved_pusd or 0
        try:
            await self.ledger.begin(row)
        except BudgetExceeded as exc:  # a shared ledger's accounts refused it (other replicas spent)
            self.budgets.release(principal.tenant, row.feature, reserved)
            await self.record_rejected(principal, row.request_id, endpoint, started, exc, **seen)
            return error_response(exc, row.request_id)
        except LedgerUnavailable:
            self.budgets.release(principal.tenant, row.feature, reserved)
            return error_response(
                NotReady("The ledger is not writable; nothing was forwarded."), row.request_id
            )
        return None

    async def _run(self, request: web.Request, call: Call, meter: Recorder) -> web.StreamResponse:
        """Forward, relay and meter an admitted call; its row is terminal whatever happens."""
        self.metrics.in_flight += 1
        task = asyncio.current_task(meter.loop)
        if task is not None:
            self._admitted.add(task)
        try:
            if call.stream:
                return await self._stream(request, call, meter)
            return await self._unary(request, call, meter)
        finally:
            self._admitted.discard(task)
            self.metrics.in_flight -= 1
            await meter.ensure_finished()

    def authenticate(self, request: web.Request) -> Principal:
        """The caller's tenant; a peer with too many recent failures is refused before lookup."""
        # no failures tracked (the usual case): skip the peer-address lookup entirely
        peer = (request.remote or "") if self.auth_failures else ""
        if peer:
            self.auth_failures.check(peer)
        try:
            values = request.headers.getall("Authorization", [])
            if len(values) > 1:
                raise AuthenticationError("Send exactly one Authorization header.")
            return self.keys.authenticate(values[0] if values else None)
        except AuthenticationError:
            self.auth_failures.failed(peer or request.remote or "")
            raise

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.config.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        try:
            if request.content.is_eof():  # the usual case: the body came with the headers
                return await request.read()
            # a deadline for the whole body: a client trickling bytes cannot hold a slot forever
            async with asyncio.timeout(self.config.limits.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.") from None
        except TimeoutError:
            raise BodyTimeout(
                f"The request body did not arrive within {self.config.limits.body_timeout:g} s."
            ) from None

    def rates_for(self, principal: Principal, model: str) -> Rates | None:
        tenant = self.config.tenants[principal.tenant]
        if tenant.models is not None and model not in tenant.models:
            raise ModelNotAllowed(f"Model '{model}' is not enabled for this API key.")
        rates = self.config.prices.get(model)
        if rates is None and self.config.unpriced_models == "reject":
            raise ModelNotPriced(
                f"Model '{model}' has no price configured in together-meter; "
                "ask the operator to add it to the price table."
            )
        return rates

    def _reserve(self, call: Call, rates: Rates | None) -> int | None:
        """Upper bound of the request's cost: every body byte a token, plus max output.

        Without max_tokens the output bound is the configured cap for the model (budgets.
        max_output_tokens, else default_max_output_tokens): an assumption, not a guarantee.
        """
        if rates is None:
            return None
        prompt_bound = len(call.raw)  # a BPE token is at least one byte of the text
        if call.endpoint in INPUT_ONLY:
            return prompt_bound * rates.input
        out = call.max_tokens
        if out is None:
            caps = self.config.budgets
            out = caps.max_output_tokens.get(call.model, caps.default_max_output_tokens)
            out *= call.body.get("n") or 1
        return prompt_bound * rates.input + out * rates.output

    async def record_rejected(
        self,
        principal: Principal,
        request_id: str,
        endpoint: str,
        started: int,
        exc: MeterError,
        *,
        model: str,
        feature: str | None,
        environment: str | None,
    ) -> None:
        """An authenticated request we refused: one row, nothing forwarded, nothing billed."""
        final = LedgerRow(
            request_id,
            principal.tenant,
            principal.key_id,
            model,
            endpoint,
            SERVERLESS,
            feature,
            environment,
            False,
            started,
            self.period(started),
            status="rejected",
            finished_us=now_us(),
            error_code=exc.code,
            cost_pusd=0,
        )
        with contextlib.suppress(LedgerUnavailable):
            await self.ledger.record(final)

    # -- non-streaming ---------------------------------------------------------------------

    async def _unary(self, request: web.Request, call: Call, meter: Recorder) -> web.Response:
        try:
            up = await self._forward(request, call)
        except MeterError as exc:
            await meter.fail(exc)
            return error_response(exc, meter.row.request_id)
        return await self._respond_whole(request, call, meter, up)

    async def _respond_whole(
        self, request: web.Request, call: Call, meter: Recorder, up: UpstreamResponse
    ) -> web.Response:
        """Read the upstream's answer whole, meter it, pass it on (also a stream request's
        answer when the upstream replies without SSE, e.g. with an error)."""
        try:
            async with up:
                data = await self.read_upstream(up)
        except MeterError as exc:
            await meter.broke_off(exc, up.status)
            return error_response(exc, meter.row.request_id)
        if up.status != 200:
            await meter.upstream_error(up.status)
            return self._passthrough(up, data, meter.row.request_id, self.limits_of(meter, up))
        if self.tokenizer.needs_loading and (call.endpoint in INPUT_ONLY or b'"usage"' not in data):
            await loaded(self.tokenizer)  # an estimate is coming: load it off the loop, once
        usage, upstream_id = self._usage_of_body(call, data)
        await meter.finish(
            "ok", usage, up.status, upstream_id, client_gone=client_gone(request), complete=True
        )
        headers = {
            "x-request-id": meter.row.request_id,
            "x-meter-cost-usd": meter.cost_text,
            "x-meter-usage-source": meter.usage_source,
            **self.limits_of(meter, up),
        }
        if meter.cost_in_body and meter.cost_text != "unknown":
            data = body_with_cost(data, meter.cost_text)
        if call.endpoint == "embeddings" and call.body.get("encoding_format") == "base64":
            data = embeddings_as_base64(data)  # together answers floats; the client decodes base64
        return web.Response(body=data, status=200, headers=headers, content_type=up.content_type or JSON_CT)

    async def _forward(self, request: web.Request, call: Call) -> UpstreamResponse:
        t = time.perf_counter()
        up = await self.upstream.request(
            "POST", PATHS[call.endpoint], body=call.forward, incoming=request.headers
        )
        self.metrics.upstream_duration.observe((call.endpoint,), time.perf_counter() - t)
        return up

    async def read_upstream(self, up: UpstreamResponse) -> bytes:
        limit = self.config.limits.max_response_bytes
        try:
            if up.complete:  # the usual case: the body came with the headers, no timer needed
                return await up.read(limit)
            async with asyncio.timeout(self.config.upstream.idle_timeout):
                return await up.read(limit)
        except TimeoutError as exc:
            raise UpstreamTimeout("The upstream stopped sending its response.") from exc
        except UpstreamStreamError as exc:
            raise UpstreamProtocolError(f"The upstream response broke off: {exc}") from exc

    def _usage_of_body(self, call: Call, data: bytes) -> tuple[Usage, str | None]:
        obj: Any = None
        input_only = call.endpoint in INPUT_ONLY
        if b'"usage"' in data or not input_only:
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(data)
        upstream_id = obj.get("id") if isinstance(obj, dict) else None
        usage = (
            usage_from_json(obj.get("usage"), has_output=not input_only) if isinstance(obj, dict) else None
        )
        if usage is not None:
            return usage, upstream_id if isinstance(upstream_id, str) else None
        prompt = estimate_prompt_tokens(call.endpoint, call.body, self.tokenizer)
        completion = 0
        if not input_only:
            completion = (
                self.tokenizer.count(completion_text(obj)) if obj is not None else (len(data) + 3) // 4
            )
        return Usage(prompt, completion, "estimated"), None

    def limits_of(self, meter: Recorder, up: UpstreamResponse) -> dict[str, str]:
        """together's rate-limit headers of this answer (passed on; remembered per model)."""
        limits = passed(up.headers)
        if limits:
            self.metrics.rate_limits.observe(meter.model_label, limits)
        return limits

    @staticmethod
    def _passthrough(
        up: UpstreamResponse, data: bytes, request_id: str, limits: dict[str, str]
    ) -> web.Response:
        headers = {"x-request-id": request_id, **limits}
        return web.Response(
            body=data, status=up.status, headers=headers, content_type=up.content_type or JSON_CT
        )

    # -- streaming -------------------------------------------------------------------------

    async def _stream(self, request: web.Request, call: Call, meter: Recorder) -> web.StreamResponse:
        try:
            up = await self._forward(request, call)
        except MeterError as exc:
            await meter.fail(exc)
            return error_response(exc, meter.row.request_id)
        if up.status != 200 or up.content_type != "text/event-stream":
            return await self._respond_whole(request, call, meter, up)
        async with up:
            return await self.streams.relay(request, call, meter, up, self.limits_of(meter, up))

    # -- pass-through of model listings (not metered) --------------------------------------

    async def models(self, request: web.Request, path: str, query: str) -> web.Response:
        """GET /v1/models (a bare array on together.ai) and /v2/... listings, passed through;
        `path` and `query` are validated (routes.parse_target)."""
        request_id = new_request_id()
        try:
            self.authenticate(request)
            up = await self.upstream.request("GET", path, body=None, incoming=request.headers, query=query)
            async with up:
                data = await self.read_upstream(up)
        except MeterError as exc:
            return error_response(exc, request_id)
        if up.status == 200 and path == "/v1/models" and wants_openai_list(request.headers):
            data = openai_list(data)  # together's bare array would make OpenAI SDKs raise
        return web.Response(
            body=data,
            status=up.status,
            headers={"x-request-id": request_id},
            content_type=up.content_type or JSON_CT,
        )
