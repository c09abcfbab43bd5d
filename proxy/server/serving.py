"""Listeners: aiohttp's HTTP server with a deadline for the request head (line and headers).

aiohttp bounds neither how long a client may take to send its request head nor how long a fresh
connection may stay silent (its keep-alive timer runs about an hour), so a client sending the
head one byte at a time ("slowloris") holds a connection for as long as it likes.
`HeadDeadlineRunner` is a `web.AppRunner` whose connections get one timer each: armed when the
connection opens, or on a keep-alive connection when the first byte of the next request arrives
(the idle time between requests stays aiohttp's keep-alive timeout), and cancelled as soon as
the head is parsed. When it fires the connection is closed without an answer: nothing was
parsed, so there is no request to answer or to record. The body has its own deadline
(`limits.body_timeout`, in `relay`).

A malformed request head (bad request line, bad header, too long) gets aiohttp's 400 and is
counted (`on_malformed`); instead of aiohttp's ERROR line with a traceback per connection, which
lets anyone who can open a connection flood the log, it is logged as one WARNING line at most
every `MALFORMED_LOG_EVERY` seconds per listener, saying how many there were in between. The
line names the peer and the kind of error, never the bytes sent (they may hold a key).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

__all__ = ["MALFORMED_LOG_EVERY", "HeadDeadlineRunner"]

log = logging.getLogger(__name__)
MALFORMED_LOG_EVERY = 10.0  # seconds between two log lines about malformed request heads


class HeadDeadlineRunner(web.AppRunner):
    """A `web.AppRunner` that closes connections whose request head is late.

    `on_timeout` is called once per connection closed that way (e.g. to count it),
    `on_malformed` once per malformed request head answered 400.
    """

    __slots__ = ("_header_timeout", "_on_malformed", "_on_timeout")

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        on_timeout: Callable[[], None] | None = None,
        on_malformed: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._on_timeout = on_timeout
        self._on_malformed = on_malformed

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's startup hooks and freezes it
        return _Server(base, self._header_timeout, self._on_timeout, self._on_malformed)


class _Server(web.Server):
    """aiohttp's connection manager, making `_Handler`s instead of plain RequestHandlers."""

    def __init__(
        self,
        base: web.Server,
        header_timeout: float,
        on_timeout: Callable[[], None] | None,
        on_malformed: Callable[[], None] | None,
    ) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self.header_timeout = header_timeout
        self.on_timeout = on_timeout
        self.on_malformed = on_malformed
        self._logged_at = -MALFORMED_LOG_EVERY  # monotonic time of the last line
        self._unlogged = 0  # malformed heads since then

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def malformed(self, peer: str | None, status: int, exc: HttpProcessingError) -> None:
        """Count a malformed head; log it unless a line went out less than 10 s ago."""
        if self.on_malformed is not None:
            self.on_malformed()
        now = time.monotonic()
        if now - self._logged_at < MALFORMED_LOG_EVERY:
            self._unlogged += 1
            return
        more = f"; {self._unlogged} more since the last such line" if self._unlogged else ""
        log.warning("malformed request from %s answered %d (%s)%s", peer, status, type(exc).__name__, more)
        self._logged_at, self._unlogged = now, 0


class _Handler(RequestHandler):
    """One connection. Per read it only compares a counter; the timer exists while a head is due."""

    __slots__ = ("_head_timeout", "_head_timer", "_on_head_timeout", "_quiet", "_server")

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._head_timeout = manager.header_timeout
        self._on_head_timeout = manager.on_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._quiet = False

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self._server.malformed(request.remote, status, exc)
        self._quiet = True  # aiohttp's own line (ERROR, with a traceback) is replaced by ours
        try:
            return super().handle_error(request, status, exc, message)
        finally:
            self._quiet = False

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if not self._quiet:
            super().log_exception(*args, **kw)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_late)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count  # heads parsed so far on this connection
        waiter = self._waiter
        idle = waiter is not None and not waiter.done()  # the previous response is finished
        super().data_received(data)
        if self._request_count != heads:  # a whole head arrived: the deadline is met
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif idle and data and self._head_timer is None:  # the next request started, partially
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if self._on_head_timeout is not None:
            self._on_head_timeout()
        self.force_close()
