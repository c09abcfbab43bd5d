"""Relay one SSE stream from the upstream to the client, chunk by chunk, and meter it.

The stream's ledger row is made terminal (recorder.py) before the client sees `data: [DONE]`;
a client that leaves mid-stream still gets its row: the relay reads on for up to
`upstream.client_abort_grace` seconds to learn what the upstream billed, else estimates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.core.calls import Call
from proxy.core.sse import SSEError, SSEFramer
from proxy.core.streaming import StreamMeter
from proxy.core.usage import Tokenizer, Usage, estimate_prompt_tokens
from proxy.errors import MeterError, NotReady, UpstreamProtocolError, UpstreamTimeout
from proxy.server.metrics import Metrics
from proxy.server.recorder import Recorder
from proxy.server.responses import client_gone
from proxy.server.tokens import loaded
from proxy.upstream.client import UpstreamResponse, UpstreamStreamError

log = logging.getLogger(__name__)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = (ConnectionError, aiohttp.ClientConnectionResetError)
# why a stream ended early, as the upstream-error metric names it
STREAM_ERRORS = {"upstream_timeout": "stream_stalled", "upstream_error": "stream_error_event"}


class StreamRelay:
    """Relays streams; one per app (the per-stream state lives in `_Stream`)."""

    def __init__(self, config: Callable[[], Config], metrics: Metrics, tokenizer: Tokenizer) -> None:
        self.config = config  # a getter: timeouts follow config reloads
        self.metrics = metrics
        self.tokenizer = tokenizer

    async def relay(
        self,
        request: web.Request,
        call: Call,
        meter: Recorder,
        up: UpstreamResponse,
        extra_headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """Relay `up` (an open 200 text/event-stream answer) to the client and record it;
        `extra_headers` (together's rate-limit headers) go with the response head."""
        stream = _Stream(self, request, call, meter, up, extra_headers or {})
        await stream.open()
        try:
            status = await stream.pump()
        except asyncio.CancelledError:  # shutdown: the drain timeout ran out mid-stream
            await stream.abort()
            raise
        await stream.conclude(status)
        return stream.resp

    def estimate(self, call: Call, sm: StreamMeter) -> Usage:
        """The stream's usage when the upstream never said it: tokenizer counts, flagged estimated."""
        prompt = estimate_prompt_tokens(call.endpoint, call.body, self.tokenizer)
        text, extra_bytes = sm.received_text()
        completion = self.tokenizer.count(text) + (extra_bytes + 3) // 4
        return Usage(prompt, completion, "estimated")


class _Stream:
    """One stream being relayed: its response, framer, meter, deadline and client state."""

    def __init__(
        self,
        owner: StreamRelay,
        request: web.Request,
        call: Call,
        meter: Recorder,
        up: UpstreamResponse,
        extra_headers: dict[str, str],
    ) -> None:
        config = owner.config()
        self.owner, self.request, self.call, self.meter, self.up = owner, request, call, meter, up
        self.cfg = config.upstream
        self.loop = meter.loop
        self.deadline = meter.started + self.cfg.total_timeout
        self.framer = SSEFramer(config.limits.max_event_bytes)
        # a client that opted in to the cost in the body gets the usage chunk, with the cost
        price = meter.quote if meter.cost_in_body else None
        self.sm = StreamMeter(hide_usage_chunk=not (call.wants_usage or meter.cost_in_body), price=price)
        self.client_gone = False
        self.window: asyncio.Timeout | None = None  # the total deadline, while pumping
        self.last_read = 0.0  # loop time the last chunk was relayed: the idle gap counts from it
        self._idle: asyncio.TimerHandle | None = None
        self.tail = b""  # what the block holding [DONE] relays: written with the ending
        headers = {**SSE_HEADERS, **extra_headers, "x-request-id": meter.row.request_id}
        self.resp = web.StreamResponse(status=200, headers=headers)

    async def open(self) -> None:
        try:
            await self.resp.prepare(self.request)
        except CLIENT_GONE:  # gone before the upstream answered: read on briefly for the usage
            self._left()

    def _left(self) -> None:
        """The client went away: keep reading only briefly (the usage chunk is what was billed)."""
        self.client_gone = True
        self.deadline = min(self.deadline, self.loop.time() + self.cfg.client_abort_grace)
        window = self.window
        if window is not None and not window.expired():
            window.reschedule(min(window.when() or self.deadline, self.deadline))

    def _check_idle(self) -> None:
        """The idle timer fired: end the pump if nothing was relayed for idle_timeout, else wait
        on. (One timer per idle period, not one rescheduled per chunk.)"""
        window, now = self.window, self.loop.time()
        due = self.last_read + self.cfg.idle_timeout
        if window is None or window.expired():
            return
        if due <= now:
            window.reschedule(now)  # the timeout fires: pump returns "upstream_timeout"
        else:
            self._idle = self.loop.call_at(due, self._check_idle)

    async def pump(self) -> str:
        """Relay chunks until the stream is done ("ok") or ends otherwise (its status)."""
        loop = self.loop
        self.last_read = loop.time()
        self._idle = loop.call_at(self.last_read + self.cfg.idle_timeout, self._check_idle)
        try:
            async with asyncio.timeout_at(self.deadline) as self.window:
                sm, framer, resp = self.sm, self.framer, self.resp
                while chunk := await self.up.readany():
                    out = sm.feed_block(framer.take(chunk))
                    if sm.done:  # the last bytes go out with the end of the stream (conclude)
                        self.tail = out
                        if sm.first_token_at is None and sm.saw_content:
                            self._first_token()
                        return "ok"
                    if out and not self.client_gone:
                        try:  # inline, not a coroutine call: this runs once per chunk
                            await resp.write(out)
                        except CLIENT_GONE:
                            self._left()
                    if sm.first_token_at is None and sm.saw_content:
                        self._first_token()
                    self.last_read = loop.time()
        except TimeoutError:
            return "upstream_timeout"  # idle gap, total deadline, or the abort grace ran out
        except (UpstreamStreamError, SSEError) as exc:
            log.warning("upstream stream broke off: %s", type(exc).__name__)
        finally:
            self._idle.cancel()
            self.window = None
        return "upstream_aborted"  # EOF without [DONE], or a broken stream

    def _first_token(self) -> None:
        sm = self.sm
        sm.first_token_at = time.perf_counter()
        self.owner.metrics.ttft.observe((self.meter.model_label,), sm.first_token_at - self.meter.t0)

    async def conclude(self, status: str) -> None:
        """Record the row, then (only then) let the client see the end of the stream."""
        sm = self.sm
        if sm.error_event and status != "ok":
            status = "upstream_error"
        self.client_gone = self.client_gone or client_gone(self.request)
        if status != "ok" and not self.client_gone:
            self.owner.metrics.upstream_error(STREAM_ERRORS.get(status, "stream_cut"))
        if sm.usage is None:
            await loaded(self.owner.tokenizer)
        usage = sm.usage or self.owner.estimate(self.call, sm)
        await self.meter.finish(
            status, usage, 200, sm.upstream_id, client_gone=self.client_gone, complete=sm.done
        )
        if not self.client_gone:
            with contextlib.suppress(*CLIENT_GONE):
                await self.resp.write_eof(self._ending(status))  # one write: bytes and end

    def _ending(self, status: str) -> bytes:
        """The last bytes the client sees: the last chunks before [DONE] (held back until the row
        is recorded), the cost and [DONE]; or an error event."""
        if self.sm.done:
            cost = b": x-meter-cost-usd=" + self.meter.cost_text.encode()
            return self.tail + cost + b"\n\ndata: [DONE]\n\n"
        if self.sm.error_event:
            return b""  # the upstream's own error event was relayed already
        err: MeterError = UpstreamProtocolError("The upstream stream ended before it was complete.")
        if status == "upstream_timeout":
            err = UpstreamTimeout("The upstream stream stalled.")
        return b"data: " + err.body_bytes() + b"\n\n"

    async def abort(self) -> None:
        """Record a stream cut by shutdown (usage seen, else estimated), then tell the client.

        The client gets a terminal error event and never a `[DONE]`: its answer is incomplete.
        """
        sm = self.sm
        if sm.usage is None:
            await asyncio.shield(loaded(self.owner.tokenizer))
        usage = sm.usage or self.owner.estimate(self.call, sm)
        await asyncio.shield(
            self.meter.finish(
                "shutdown_aborted", usage, 200, sm.upstream_id, client_gone=False, complete=False
            )
        )
        if self.client_gone or client_gone(self.request):
            return
        err = NotReady("The proxy shut down before the stream was complete.", code="shutdown")
        with contextlib.suppress(*CLIENT_GONE, TimeoutError):
            async with asyncio.timeout(1.0):  # a client that stopped reading cannot hold shutdown
                await self.resp.write(b"data: " + err.body_bytes() + b"\n\n")
                await self.resp.write_eof()
