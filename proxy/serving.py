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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["HeadDeadlineRunner"]


class HeadDeadlineRunner(web.AppRunner):
    """A `web.AppRunner` that closes connections whose request head is late.

    `on_timeout` is called once per connection closed that way (e.g. to count it).
    """

    __slots__ = ("_header_timeout", "_on_timeout")

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        on_timeout: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._on_timeout = on_timeout

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's startup hooks and freezes it
        return _Server(base, self._header_timeout, self._on_timeout)


class _Server(web.Server):
    """aiohttp's connection manager, making `_Handler`s instead of plain RequestHandlers."""

    def __init__(
        self, base: web.Server, header_timeout: float, on_timeout: Callable[[], None] | None
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

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _Handler(RequestHandler):
    """One connection. Per read it only compares a counter; the timer exists while a head is due."""

    __slots__ = ("_head_timeout", "_head_timer", "_on_head_timeout")

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = manager.header_timeout
        self._on_head_timeout = manager.on_timeout
        self._head_timer: asyncio.TimerHandle | None = None

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
