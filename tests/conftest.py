"""Fixtures shared by unit and end-to-end tests: a webhook receiver on a free loopback port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web


@dataclass
class WebhookReceiver:
    """Records every POST; answers 500 to the first `fail_first` ones, 200 after that.

    While `hold` is cleared, each POST waits for it before answering.
    """

    url: str = ""
    fail_first: int = 0
    posts: list[dict[str, Any]] = field(default_factory=list)  # every POST, failed ones included
    times: list[float] = field(default_factory=list)  # monotonic arrival time of each POST
    content_types: list[str] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at the first POST

    def __post_init__(self) -> None:
        self.hold.set()

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """The bodies that got a 2xx answer."""
        return self.posts[self.fail_first :]

    async def handle(self, request: web.Request) -> web.Response:
        self.times.append(time.monotonic())
        self.content_types.append(request.content_type)
        self.posts.append(orjson.loads(await request.read()))
        self.arrived.set()
        await self.hold.wait()
        if len(self.posts) <= self.fail_first:
            return web.Response(status=500, text="receiver failing on purpose")
        return web.Response(status=200, text="ok")


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    """A running receiver at `webhook.url`; stopped at teardown whatever the test did."""
    receiver = WebhookReceiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        yield receiver
    finally:
        receiver.hold.set()
        await runner.cleanup()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 (created and dropped per test); see tests/pg.py."""
    from tests.pg import pg_database

    async with pg_database() as dsn:
        yield dsn
