"""End-to-end fixtures: the real proxy in front of the real simulator, both on loopback port 0.

`meter` yields a `Meter` (proxy, simulator, tenant keys, ledger path, operator key, helpers);
`start_meter(...)` starts another one with a changed config or upstream. Both always stop the
proxy, the simulator and every SDK client they made, whatever the test did. Tests using them run
once per ledger backend (SQLite file, fresh PostgreSQL database), except those marked
`@pytest.mark.sqlite_only`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.core.usage import Tokenizer

from .support import Meter, StartMeter, running_meter_on

BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """Loaded once for the session (about 0.15 s); the proxy would load it per start."""
    return Tokenizer.load()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on a meter runs on both ledger backends, unless marked `sqlite_only`."""
    if "ledger_backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("ledger_backend", ["sqlite"] if only else list(BACKENDS), indirect=True)


@pytest.fixture
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """The ledger backend of this test's meters: sqlite (a file) or postgres (a fresh database)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
async def meter(tmp_path: Path, tokenizer: Tokenizer, ledger_backend: str) -> AsyncIterator[Meter]:
    async with running_meter_on(ledger_backend, tmp_path / "ledger.db", tokenizer) as m:
        yield m


@pytest.fixture
def start_meter(tmp_path: Path, tokenizer: Tokenizer, ledger_backend: str) -> StartMeter:
    """`async with start_meter(upstream=..., change=...) as m`: a meter with its own ledger."""
    counter = itertools.count(1)

    def start(**kwargs: Any) -> contextlib.AbstractAsyncContextManager[Meter]:
        return running_meter_on(ledger_backend, tmp_path / f"ledger-{next(counter)}.db", tokenizer, **kwargs)

    return start


@pytest.fixture
async def silent_upstream() -> AsyncIterator[tuple[str, list[str]]]:
    """An upstream that accepts connections and never answers (until teardown releases it)."""
    release = asyncio.Event()
    hits: list[str] = []

    async def hang(request: web.Request) -> web.Response:
        hits.append(request.path)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", hits
    finally:
        release.set()
        await runner.cleanup()
