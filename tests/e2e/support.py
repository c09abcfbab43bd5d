"""Shared pieces of the end-to-end tests: `Meter`, `running_meter`, small HTTP helpers.

The fixtures that use them live in conftest.py; tests import names from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from proxy import simulator
from proxy.config import Config, load_config
from proxy.core.auth import digest, new_key
from proxy.core.pricing import cost_pusd, format_usd
from proxy.core.usage import Tokenizer, Usage
from proxy.ledger import IN_FLIGHT, LedgerRow
from proxy.server.app import Proxy, Secrets, with_overrides
from proxy.simulator import RunningSimulator

CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
# A canary: if this string shows up anywhere a client can see, the operator key leaked.
OPERATOR_KEY = "sk-operator-canary-7f3a9c"
ADMIN_TOKEN = "admin-token-e2e-51d0"
CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # on globex's allow-list
SMALL_CHAT_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"  # on globex's allow-list
ACME_ONLY_MODEL = "deepseek-ai/DeepSeek-V3"  # priced, not on globex's allow-list
LANGUAGE_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
EMBEDDING_MODEL = "BAAI/bge-large-en-v1.5"
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How much did this request cost?"},
]
ROW_WAIT_S = 10.0


@dataclass
class Meter:
    """One running proxy + simulator pair and what a test needs to drive and inspect them."""

    proxy: Proxy
    sim: RunningSimulator
    keys: dict[str, str]  # tenant -> its fresh API key
    ledger_path: Path
    upstream_seen: list[dict[str, Any]]  # every request that reached the simulator
    backend: str = "sqlite"  # the ledger backend: "sqlite" (ledger_path) or "postgres" (a fresh database)
    operator_key: str = OPERATOR_KEY
    admin_token: str = ADMIN_TOKEN
    _clients: list[AsyncOpenAI] = field(default_factory=list)

    @property
    def config(self) -> Config:
        return self.proxy.config

    @property
    def base_url(self) -> str:
        """The openai SDK base URL (ends in /v1)."""
        return f"http://127.0.0.1:{self.proxy.port}/v1"

    @property
    def origin(self) -> str:
        """The together SDK base URL (no /v1: it adds that itself)."""
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.proxy.admin_port}"

    def openai(self, tenant: str = "acme") -> AsyncOpenAI:
        """An AsyncOpenAI client for `tenant` through the proxy (closed at teardown)."""
        client = AsyncOpenAI(base_url=self.base_url, api_key=self.keys[tenant], max_retries=0, timeout=20)
        self._clients.append(client)
        return client

    def direct_openai(self) -> AsyncOpenAI:
        """An AsyncOpenAI client straight to the simulator, with the operator key."""
        client = AsyncOpenAI(base_url=self.sim.url, api_key=self.operator_key, max_retries=0, timeout=20)
        self._clients.append(client)
        return client

    def auth(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def cost(self, model: str, prompt: int, completion: int) -> int:
        """Exact pico-USD cost of these tokens at the configured serverless rates."""
        rates = self.config.prices.get(model)
        assert rates is not None, model
        return cost_pusd(Usage(prompt, completion), rates)

    def cost_text(self, model: str, prompt: int, completion: int) -> str:
        return format_usd(self.cost(model, prompt, completion))

    async def rows(self) -> list[LedgerRow]:
        return await self.proxy.ledger.rows()

    async def row(self, request_id: str) -> LedgerRow:
        """The one row of `request_id` (fails if there are zero or several)."""
        found = [r for r in await self.rows() if r.request_id == request_id]
        assert len(found) == 1, f"{len(found)} rows for {request_id}"
        return found[0]

    async def wait_terminal(self, count: int = 1, within: float = ROW_WAIT_S) -> list[LedgerRow]:
        """Poll (bounded) until the ledger holds `count` rows, none of them in flight."""
        deadline = time.monotonic() + within
        while True:
            rows = await self.rows()
            if len(rows) >= count and all(r.status != IN_FLIGHT for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"ledger not settled after {within} s: {rows}")
            await asyncio.sleep(0.05)

    async def admin_get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s, s.get(self.admin + path, headers=headers) as r:
            return r.status, await r.read()

    async def metrics_text(self) -> str:
        status, body = await self.admin_get("/metrics")
        assert status == 200, body
        return body.decode()

    async def metric_samples(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Sample name -> {sorted label pairs -> value}, parsed by prometheus_client."""
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(await self.metrics_text()):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    async def restart(self) -> None:
        """Stop the proxy and start a new one on the same config and ledger file."""
        config, secrets, tokenizer = self.proxy.config, self.proxy.secrets, self.proxy.relay.tokenizer
        await self.proxy.stop()
        self.proxy = await _start_proxy(config, secrets, tokenizer)

    async def aclose(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
        await self.proxy.stop()


async def post_raw(
    url: str, body: bytes | dict[str, Any] | None, headers: dict[str, str], method: str = "POST"
) -> tuple[int, CIMultiDict[str], bytes]:
    """One request with aiohttp: status, headers (case-insensitive), the whole body as bytes."""
    data = orjson.dumps(body) if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **headers} if data is not None else headers
    async with aiohttp.ClientSession() as s, s.request(method, url, data=data, headers=hdrs) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def error_of(body: bytes) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error body, checking that shape exactly."""
    parsed = orjson.loads(body)
    assert list(parsed) == ["error"], parsed
    err = parsed["error"]
    assert set(err) == {"message", "type", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def usd(pusd: int) -> Decimal:
    return Decimal(pusd) / Decimal(10**12)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_simulator() -> tuple[RunningSimulator, list[dict[str, Any]]]:
    """The real simulator app plus a middleware noting every request that reaches it."""
    app = simulator.create_app()
    seen: list[dict[str, Any]] = []

    @web.middleware
    async def note(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        )
        return await handler(request)

    app.middlewares.append(note)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningSimulator("127.0.0.1", runner.addresses[0][1], app, runner), seen


async def _start_proxy(config: Config, secrets: Secrets, tokenizer: Tokenizer) -> Proxy:
    proxy = Proxy(config, secrets, tokenizer=tokenizer)
    try:
        await proxy.start()
    except BaseException:
        await proxy.stop()
        raise
    return proxy


StartMeter = Callable[..., contextlib.AbstractAsyncContextManager[Meter]]


@contextlib.asynccontextmanager
async def running_meter(
    ledger_path: Path,
    tokenizer: Tokenizer,
    *,
    upstream: str | None = None,
    change: Callable[[Config], Config] | None = None,
    ledger_dsn: str | None = None,
) -> AsyncIterator[Meter]:
    """Simulator + proxy (config/example.yaml with fresh keys, loopback ports, this ledger).

    With `ledger_dsn` the ledger is that PostgreSQL database instead of the file `ledger_path`.
    """
    base = load_config(CONFIG_PATH)
    keys = {name: new_key() for name in base.tenants}
    tenants = {n: replace(t, key_digests=(digest(keys[n]),)) for n, t in base.tenants.items()}
    sim, seen = await start_simulator()
    try:
        config = with_overrides(
            replace(base, tenants=tenants),
            upstream=upstream or sim.url,
            port=0,
            admin_port=0,
            ledger_path=ledger_path,
        )
        # bounded teardown: a request still in flight cannot hold the test for 30 s
        config = replace(config, limits=replace(config.limits, drain_timeout=3))
        if ledger_dsn is not None:
            config = replace(config, ledger=replace(config.ledger, backend="postgres", dsn=ledger_dsn))
        if change is not None:
            config = change(config)
        proxy = await _start_proxy(config, Secrets(OPERATOR_KEY, admin_token=ADMIN_TOKEN), tokenizer)
        meter = Meter(proxy, sim, keys, ledger_path, seen, "sqlite" if ledger_dsn is None else "postgres")
        try:
            yield meter
        finally:
            await meter.aclose()
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def running_meter_on(
    backend: str, ledger_path: Path, tokenizer: Tokenizer, **kwargs: Any
) -> AsyncIterator[Meter]:
    """`running_meter` on a SQLite file, or on a fresh PostgreSQL database (dropped afterwards)."""
    if backend == "sqlite":
        async with running_meter(ledger_path, tokenizer, **kwargs) as m:
            yield m
        return
    from tests.pg import pg_database

    async with pg_database() as dsn, running_meter(ledger_path, tokenizer, ledger_dsn=dsn, **kwargs) as m:
        yield m
