"""The hot path: authenticate -> admit -> forward -> relay -> meter -> record.

`Relay.handle` reads top to bottom; each step is a named call. Every admitted request gets a
ledger row committed as `in_flight` before it is forwarded and made terminal exactly once,
before the client sees the end of its response (the JSON body, or `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.config import LABEL_VALUE_RE, Config
from proxy.core.auth import FailureLimiter, KeyStore, Principal
from proxy.core.budgets import BudgetBook, BudgetExceeded
from proxy.core.pricing import SERVERLESS, Rates, cost_pusd, format_usd
from proxy.core.routes import ROUTES, check_header_values
from proxy.core.sse import SSEError, SSEFramer
from proxy.core.streaming import StreamMeter
from proxy.core.usage import Tokenizer, Usage, completion_text, estimate_prompt_tokens, usage_from_json
from proxy.errors import (
    AuthenticationError,
    BodyTimeout,
    BodyTooLarge,
    InvalidField,
    InvalidJSON,
    MeterError,
    ModelNotAllowed,
    ModelNotPriced,
    NotReady,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.ledger import Ledger, LedgerRow, LedgerUnavailable, now_us
from proxy.server.metrics import Metrics
from proxy.upstream.client import FORWARDED_HEADERS, UpstreamClient, UpstreamResponse, UpstreamStreamError

log = logging.getLogger(__name__)

# path -> ledger endpoint of the metered inference routes (routes.py holds the whole table)
ENDPOINTS = {r.pattern: r.name for r in ROUTES.routes if r.kind == "inference"}
PATHS = {name: path for path, name in ENDPOINTS.items()}
JSON_CT = "application/json"


@dataclass(frozen=True, slots=True)
class Call:
    """A validated request body."""

    endpoint: str
    model: str
    stream: bool
    body: dict[str, Any]
    wants_usage: bool  # the client asked for stream usage itself
    max_tokens: int | None  # output bound across all `n` choices, if the request gave one
    raw: bytes  # as the client sent it
    forward: bytes  # what goes upstream: `raw`, with stream_options.include_usage when we must add it


def new_request_id() -> str:
    """Time-ordered and unique: `req_` + µs clock (hex) + 48 random bits (not a secret)."""
    return f"req_{time.time_ns() // 1000:013x}{random.getrandbits(48):012x}"


def parse_call(endpoint: str, raw: bytes) -> Call:
    """Validate the JSON body enough to meter it; unknown fields pass through untouched."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc.args[0]}") from None
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidField("'model' is required and must be a non-empty string.")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidField("'stream' must be a boolean.")
    if endpoint == "embeddings" and stream:
        raise InvalidField("'stream' is not supported for embeddings.")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (type(value) is not int or value < 0):
            raise InvalidField(f"'{name}' must be a non-negative integer.")
        if value is not None and max_tokens is None:
            max_tokens = value
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= 128):
        raise InvalidField("'n' must be an integer between 1 and 128.")
    if max_tokens is not None and n is not None:
        max_tokens *= n  # n choices: up to n times the output
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise InvalidField("'messages' must be a non-empty array of message objects.")
    elif endpoint == "completions":
        if not isinstance(body.get("prompt"), str | list):
            raise InvalidField("'prompt' must be a string or an array.")
    elif not isinstance(body.get("input"), str | list):
        raise InvalidField("'input' must be a string or an array.")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidField("'stream_options' must be an object.")
    wants_usage = bool(options and options.get("include_usage") is True)
    forward = _with_stream_usage(body, raw) if stream and not wants_usage else raw
    return Call(endpoint, model, stream, body, wants_usage, max_tokens, raw, forward)


def _with_stream_usage(body: dict[str, Any], raw: bytes) -> bytes:
    """The body plus stream_options.include_usage, so the stream's last chunk carries the usage."""
    if "stream_options" not in body:
        # the usual case: insert the key after the opening brace and leave the client's bytes
        # as they are (re-encoding would cost time and fail on very deep nesting)
        start = raw.index(b"{") + 1
        return raw[:start] + b'"stream_options":{"include_usage":true},' + raw[start:]
    body = {**body, "stream_options": {**(body["stream_options"] or {}), "include_usage": True}}
    try:
        return orjson.dumps(body)
    except TypeError:  # nesting deeper than orjson writes (255 levels): json can, up to its limit
        import json

        try:
            return json.dumps(body, separators=(",", ":")).encode()
        except RecursionError:
            raise InvalidJSON("The request body is nested too deeply.") from None


def attribution(request: web.Request, call: Call) -> tuple[str | None, str | None]:
    """Feature and environment from X-Meter-* headers, else the body's `metadata`."""
    meta = call.body.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    values = []
    for header, key in (("X-Meter-Feature", "feature"), ("X-Meter-Environment", "environment")):
        value, source = request.headers.get(header), header
        if value is None:
            value, source = meta.get(key), f"metadata.{key}"
        if value is not None and (not isinstance(value, str) or not LABEL_VALUE_RE.match(value)):
            raise InvalidField(
                f"{source} must be 1-64 characters of letters, digits, '.', '_', "
                "':', '/', '-', starting with a letter or digit."
            )
        values.append(value)
    return values[0], values[1]


def error_response(exc: MeterError, request_id: str | None = None) -> web.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    if exc.retryable is False:
        headers["x-should-retry"] = "false"  # the openai SDK would otherwise retry a 429
    return web.Response(status=exc.status, body=exc.body_bytes(), content_type=JSON_CT, headers=headers)


class Relay:
    """Owns the request path; built once per app by `create_app`."""

    def __init__(
        self,
        config: Config,
        keys: KeyStore,
        upstream: UpstreamClient,
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
        self._admitted: set[asyncio.Task[Any]] = set()  # handlers `abort_in_flight` may stop
        self.clock = clock  # µs since the epoch; injectable so tests can cross a month boundary
        self._period_cache = (-1, "")
        self.auth_failures = FailureLimiter(config.limits.auth_failures_per_minute)

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
        except MeterError as exc:
            return error_response(exc, request_id)
        started = self.clock()
        period = self.period(started)
        model, feature, environment = "", None, None
        try:
            call = parse_call(endpoint, await self.read_body(request))
            model = call.model
            rates = self._rates(principal, call.model)
            feature, environment = attribution(request, call)
            reserved = self._reserve(call, rates)
            # admit: the budget check and the reservation are one synchronous step
            self.budgets.admit(principal.tenant, feature, period, reserved or 0)
        except MeterError as exc:
            await self._record_rejected(
                principal, request_id, endpoint, model, feature, environment, started, exc
            )
            return error_response(exc, request_id)
        row = LedgerRow(
            request_id,
            principal.tenant,
            principal.key_id,
            call.model,
            endpoint,
            SERVERLESS,
            feature,
            environment,
            call.stream,
            started,
            period,
            reserved_pusd=reserved,
        )
        try:
            await self.ledger.begin(row)
        except BudgetExceeded as exc:  # a shared ledger's accounts refused it (other replicas spent)
            self.budgets.release(principal.tenant, feature, reserved or 0)
            await self._record_rejected(
                principal, request_id, endpoint, model, feature, environment, started, exc
            )
            return error_response(exc, request_id)
        except LedgerUnavailable:
            self.budgets.release(principal.tenant, feature, reserved or 0)
            return error_response(NotReady("The ledger is not writable; nothing was forwarded."), request_id)
        self.metrics.overhead.observe((endpoint,), time.perf_counter() - t0)
        meter = _Recorder(self, row, rates, t0, call.body.get("n") or 1)
        self.metrics.in_flight += 1
        task = asyncio.current_task()
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

    def _rates(self, principal: Principal, model: str) -> Rates | None:
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
        if call.endpoint == "embeddings":
            return prompt_bound * rates.input
        out = call.max_tokens
        if out is None:
            caps = self.config.budgets
            out = caps.max_output_tokens.get(call.model, caps.default_max_output_tokens)
            out *= call.body.get("n") or 1
        return prompt_bound * rates.input + out * rates.output

    async def _record_rejected(
        self,
        principal: Principal,
        request_id: str,
        endpoint: str,
        model: str,
        feature: str | None,
        environment: str | None,
        started: int,
        exc: MeterError,
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

    async def _unary(self, request: web.Request, call: Call, meter: _Recorder) -> web.Response:
        try:
            up = await self._forward(request, call)
        except MeterError as exc:
            await meter.fail(exc)
            return error_response(exc, meter.row.request_id)
        return await self._respond_whole(request, call, meter, up)

    async def _respond_whole(
        self, request: web.Request, call: Call, meter: _Recorder, up: UpstreamResponse
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
            return self._passthrough(up, data, meter.row.request_id)
        usage, upstream_id = self._usage_of_body(call, data)
        await meter.finish(
            "ok", usage, up.status, upstream_id, client_gone=_client_gone(request), complete=True
        )
        headers = {
            "x-request-id": meter.row.request_id,
            "x-meter-cost-usd": meter.cost_text,
            "x-meter-usage-source": meter.usage_source,
        }
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
        if b'"usage"' in data or call.endpoint != "embeddings":
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(data)
        upstream_id = obj.get("id") if isinstance(obj, dict) else None
        usage = (
            usage_from_json(obj.get("usage"), has_output=call.endpoint != "embeddings")
            if isinstance(obj, dict)
            else None
        )
        if usage is not None:
            return usage, upstream_id if isinstance(upstream_id, str) else None
        prompt = estimate_prompt_tokens(call.endpoint, call.body, self.tokenizer)
        completion = 0
        if call.endpoint != "embeddings":
            completion = (
                self.tokenizer.count(completion_text(obj)) if obj is not None else (len(data) + 3) // 4
            )
        return Usage(prompt, completion, "estimated"), None

    @staticmethod
    def _passthrough(up: UpstreamResponse, data: bytes, request_id: str) -> web.Response:
        headers = {"x-request-id": request_id}
        retry_after = up.headers.get("retry-after")
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return web.Response(
            body=data, status=up.status, headers=headers, content_type=up.content_type or JSON_CT
        )

    # -- streaming -------------------------------------------------------------------------

    async def _stream(self, request: web.Request, call: Call, meter: _Recorder) -> web.StreamResponse:
        try:
            up = await self._forward(request, call)
        except MeterError as exc:
            await meter.fail(exc)
            return error_response(exc, meter.row.request_id)
        if up.status != 200 or up.content_type != "text/event-stream":
            return await self._respond_whole(request, call, meter, up)
        async with up:
            return await self._relay_events(request, call, meter, up)

    async def _relay_events(
        self, request: web.Request, call: Call, meter: _Recorder, up: UpstreamResponse
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "x-request-id": meter.row.request_id,
            },
        )
        cfg = self.config.upstream
        loop = asyncio.get_running_loop()
        deadline = meter.started + cfg.total_timeout
        framer = SSEFramer(self.config.limits.max_event_bytes)
        sm = StreamMeter(hide_usage_chunk=not call.wants_usage)
        status = "upstream_aborted"
        client_gone = False
        try:
            await resp.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            # the client left before the upstream answered: read on briefly for the billed usage
            client_gone = True
            deadline = min(deadline, loop.time() + cfg.client_abort_grace)
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + cfg.idle_timeout)) as window:
                while True:
                    chunk = await up.readany()
                    if not chunk:
                        break  # EOF without [DONE]: the upstream cut the stream
                    out = sm.feed(framer.feed(chunk))
                    if out and not client_gone:
                        try:
                            await resp.write(out)
                        except (ConnectionError, aiohttp.ClientConnectionResetError):
                            client_gone = True
                            # keep reading briefly: the usage chunk is what the upstream billed
                            deadline = min(deadline, loop.time() + cfg.client_abort_grace)
                        if sm.first_token_at is None and sm.saw_content:
                            sm.first_token_at = time.perf_counter()
                            self.metrics.ttft.observe((meter.model_label,), sm.first_token_at - meter.t0)
                    if sm.done:
                        status = "ok"
                        break
                    window.reschedule(min(deadline, loop.time() + cfg.idle_timeout))
        except TimeoutError:
            status = "upstream_timeout"  # idle gap, total deadline, or the abort grace ran out
        except asyncio.CancelledError:  # shutdown: the drain timeout ran out mid-stream
            await self._abort_stream(request, call, meter, sm, resp, client_gone)
            raise
        except (UpstreamStreamError, SSEError) as exc:
            log.warning("upstream stream broke off: %s", type(exc).__name__)
        if sm.error_event and status != "ok":
            status = "upstream_error"
        client_gone = client_gone or _client_gone(request)
        if status != "ok" and not client_gone:
            self.metrics.upstream_error(
                {"upstream_timeout": "stream_stalled", "upstream_error": "stream_error_event"}.get(
                    status, "stream_cut"
                )
            )
        usage = sm.usage or self._estimate_stream(call, sm)
        await meter.finish(
            "ok" if status == "ok" else status,
            usage,
            200,
            sm.upstream_id,
            client_gone=client_gone,
            complete=sm.done,
        )
        if not client_gone:
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                if sm.done:
                    # the row is committed: now the client may see the end of the stream
                    await resp.write(
                        b": x-meter-cost-usd=" + meter.cost_text.encode() + b"\n\ndata: [DONE]\n\n"
                    )
                elif not sm.error_event:
                    err: MeterError = UpstreamProtocolError(
                        "The upstream stream ended before it was complete."
                    )
                    if status == "upstream_timeout":
                        err = UpstreamTimeout("The upstream stream stalled.")
                    await resp.write(b"data: " + err.body_bytes() + b"\n\n")
                await resp.write_eof()
        return resp

    async def _abort_stream(
        self,
        request: web.Request,
        call: Call,
        meter: _Recorder,
        sm: StreamMeter,
        resp: web.StreamResponse,
        client_gone: bool,
    ) -> None:
        """Record a stream cut by shutdown (usage seen, else estimated), then tell the client.

        The client gets a terminal error event and never a `[DONE]`: its answer is incomplete.
        """
        usage = sm.usage or self._estimate_stream(call, sm)
        await asyncio.shield(
            meter.finish("shutdown_aborted", usage, 200, sm.upstream_id, client_gone=False, complete=False)
        )
        if client_gone or _client_gone(request):
            return
        err = NotReady("The proxy shut down before the stream was complete.", code="shutdown")
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError, TimeoutError):
            async with asyncio.timeout(1.0):  # a client that stopped reading cannot hold shutdown
                await resp.write(b"data: " + err.body_bytes() + b"\n\n")
                await resp.write_eof()

    def _estimate_stream(self, call: Call, sm: StreamMeter) -> Usage:
        prompt = estimate_prompt_tokens(call.endpoint, call.body, self.tokenizer)
        text, extra_bytes = sm.received_text()
        completion = self.tokenizer.count(text) + (extra_bytes + 3) // 4
        return Usage(prompt, completion, "estimated")

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
        return web.Response(
            body=data,
            status=up.status,
            headers={"x-request-id": request_id},
            content_type=up.content_type or JSON_CT,
        )


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class _Recorder:
    """Makes one request's row terminal exactly once, whatever path the request takes."""

    __slots__ = (
        "choices",
        "cost_text",
        "finished",
        "model_label",
        "rates",
        "relay",
        "row",
        "started",
        "t0",
        "usage_source",
    )

    def __init__(
        self, relay: Relay, row: LedgerRow, rates: Rates | None, t0: float, choices: int = 1
    ) -> None:
        self.relay, self.row, self.rates, self.t0 = relay, row, rates, t0
        self.choices = choices  # the request's `n` (bounds a believable usage)
        self.started = asyncio.get_running_loop().time()
        self.finished = False
        self.cost_text = "unknown"
        self.usage_source = "none"
        self.model_label = relay.metrics.model_label(row.model)

    async def finish(
        self,
        status: str,
        usage: Usage | None,
        upstream_status: int | None,
        upstream_id: str | None,
        *,
        client_gone: bool,
        complete: bool,
    ) -> None:
        if client_gone and status in ("ok", "upstream_aborted", "upstream_timeout"):
            status = "client_aborted"
        cost = None
        if usage is not None and self.rates is not None:
            cost = cost_pusd(usage, self.rates, self.row.mode)
            reserved = self.row.reserved_pusd
            if reserved is not None and not 0 <= cost <= reserved and not self._plausible(cost):
                await self._out_of_bounds(
                    status, usage, cost, reserved, upstream_status, upstream_id, complete
                )
                return
            self.cost_text = format_usd(cost)
        if usage is None:
            row = self.row.terminal(
                status,
                upstream_status=upstream_status,
                cost_pusd=cost,
                stream_complete=complete,
                upstream_id=upstream_id,
            )
        else:
            self.usage_source = usage.source
            row = self.row.terminal(
                status,
                upstream_status=upstream_status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                usage_source=usage.source,
                cost_pusd=cost,
                stream_complete=complete,
                upstream_id=upstream_id,
            )
        await self._commit(row)

    def _plausible(self, cost: int) -> bool:
        """A usage above the reservation can still be real: without max_tokens the reservation
        assumes the configured output cap, and images or chat templates can make more prompt
        tokens than body bytes. What no request can cost is more than its model's whole context
        window, times its `n` choices, at the dearer of the two rates: only beyond that (or below
        0) is the upstream's usage not believed. Without a known context length, the
        reservation is the bound."""
        rates = self.rates
        if cost < 0 or rates is None or not rates.context_length:
            return False
        ceiling = rates.context_length * max(self.choices, 1) * max(*rates.for_mode(self.row.mode))
        return cost <= ceiling

    async def _out_of_bounds(
        self,
        status: str,
        usage: Usage,
        cost: int,
        reserved: int,
        upstream_status: int | None,
        upstream_id: str | None,
        complete: bool,
    ) -> None:
        """A usage costing more than the request's upper bound (or less than 0) is not believed:
        the row is charged the reservation, flagged estimated / usage_out_of_bounds."""
        log.warning(
            "usage out of bounds for request %s (model %s): %d prompt + %d completion tokens "
            "cost %s USD, above the reservation of %s USD; charging the reservation",
            self.row.request_id,
            self.row.model,
            usage.prompt_tokens,
            usage.completion_tokens,
            format_usd(cost),
            format_usd(reserved),
        )
        self.cost_text, self.usage_source = format_usd(reserved), "estimated"
        row = self.row.terminal(
            status,
            upstream_status=upstream_status,
            usage_source="estimated",
            cost_pusd=reserved,
            stream_complete=complete,
            error_code="usage_out_of_bounds",
            upstream_id=upstream_id,
        )
        await self._commit(row)

    async def upstream_error(self, upstream_status: int) -> None:
        """The upstream answered 4xx/5xx: it billed nothing, so the cost is known to be 0."""
        self.relay.metrics.upstream_error(f"http_{upstream_status // 100}xx")
        row = self.row.terminal(
            "upstream_error",
            upstream_status=upstream_status,
            cost_pusd=0,
            error_code=f"upstream_{upstream_status}",
        )
        self.cost_text = "0"
        await self._commit(row)

    def reserved_cost(self) -> int | None:
        """What a request we cannot measure is charged: its reservation (None if unpriced)."""
        return self.row.reserved_pusd

    async def fail(self, exc: MeterError) -> None:
        """Forwarding failed before a response: unreachable (nothing billed) or timed out."""
        if isinstance(exc, UpstreamTimeout) and exc.sent:
            # the upstream may be generating (and billing) a response we will never see
            self.relay.metrics.upstream_error("timeout")
            row = self.row.terminal(
                "upstream_timeout",
                usage_source="estimated",
                cost_pusd=self.reserved_cost(),
                error_code=exc.code,
            )
        elif isinstance(exc, UpstreamTimeout):  # no connection in time: nothing was sent
            self.relay.metrics.upstream_error("connect_timeout")
            row = self.row.terminal("upstream_timeout", cost_pusd=0, error_code="connect_timeout")
        else:
            self.relay.metrics.upstream_error("unreachable")
            row = self.row.terminal("upstream_error", cost_pusd=0, error_code=exc.code)
        await self._commit(row)

    async def broke_off(self, exc: MeterError, upstream_status: int) -> None:
        """The upstream answered, then its body broke off or stalled: it may have billed the
        whole request, so the row carries the reservation (an upper bound), flagged estimated."""
        self.relay.metrics.upstream_error("body_broken")
        if upstream_status != 200:  # an error answer that broke off: still nothing billed
            await self._commit(
                self.row.terminal(
                    "upstream_error", upstream_status=upstream_status, cost_pusd=0, error_code=exc.code
                )
            )
            return
        status = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_aborted"
        row = self.row.terminal(
            status,
            upstream_status=upstream_status,
            usage_source="estimated",
            cost_pusd=self.reserved_cost(),
            error_code=exc.code,
        )
        await self._commit(row)

    async def ensure_finished(self) -> None:
        """Last resort (cancellation, a bug): still make the row terminal, at reserved cost."""
        if self.finished:
            return
        row = self.row.terminal(
            "shutdown_aborted", usage_source="estimated", cost_pusd=self.reserved_cost(), error_code="aborted"
        )
        await asyncio.shield(self._commit(row))

    async def _commit(self, row: LedgerRow) -> None:
        if self.finished:
            return
        self.finished = True
        # counters are bumped by the ledger when the row commits (even if we are cancelled)
        try:
            made = await self.relay.ledger.finish(row)
        except LedgerUnavailable:
            log.error(
                "ledger: could not record request %s; it stays in flight until the ledger "
                "commits it, else the reaper charges its reservation",
                row.request_id,
            )
            return
        if not made:  # a shared ledger's reaper settled it first: drop our local reservation
            self.relay.budgets.release(row.tenant, row.feature, row.reserved_pusd or 0)
        self.relay.metrics.request_duration.observe(
            (row.endpoint, "true" if row.stream else "false"), time.perf_counter() - self.t0
        )
