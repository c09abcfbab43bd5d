"""Wiring: `create_proxy(config, secrets)` builds the public and admin apps and their parts.

Nothing here runs at import time; all state lives on the `Proxy` object and typed AppKeys.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from proxy.config import Config
from proxy.core.auth import KeyStore
from proxy.core.budgets import BudgetBook
from proxy.core.uploads import token_key
from proxy.core.usage import Tokenizer
from proxy.errors import ConfigError
from proxy.ledger import Ledger, LedgerRow, LedgerUnavailable, now_us
from proxy.ledger.factory import open_ledger
from proxy.ledger.postgres import PostgresLedger
from proxy.server.admin import build_admin_app
from proxy.server.batches import BatchTracker
from proxy.server.dedicated import DedicatedFollower
from proxy.server.dispatch import Dispatcher
from proxy.server.media import UnitRelay
from proxy.server.metrics import Metrics
from proxy.server.notify import Notifier
from proxy.server.objects import ObjectGateway
from proxy.server.passthrough import Passthrough
from proxy.server.relay import ENDPOINTS, Relay
from proxy.server.serving import HeadDeadlineRunner
from proxy.server.state import Fleet, Secrets
from proxy.server.uploads import UploadRelay
from proxy.server.videos import VideoTracker
from proxy.upstream.hosts import Upstreams
from proxy.upstream.store import ObjectStore

log = logging.getLogger(__name__)
BUDGET_SYNC_INTERVAL = 1.0  # seconds between reads of a shared ledger's budget accounts
GC_YOUNG_THRESHOLD = 10_000  # allocations between collections of the youngest generation
RELAY_KEY: web.AppKey[Relay] = web.AppKey("relay", Relay)
# single: public + admin listeners (the default). `serve --workers N` (proxy/server/workers.py): each
# worker serves the public port (SO_REUSEPORT) without an admin listener; the supervisor serves
# only the admin listener and forwards nothing
Role = Literal["single", "worker", "supervisor"]


class Proxy:
    """A running together-meter: public listener, admin listener, ledger, upstream client."""

    def __init__(
        self,
        config: Config,
        secrets: Secrets,
        *,
        tokenizer: Tokenizer | None = None,
        ledger: Ledger | None = None,
        loader: Callable[[], Config] | None = None,
        clock: Callable[[], int] = now_us,
        role: Role = "single",
    ) -> None:
        self.config = config
        self.role = role
        self.fleet: Fleet | None = None  # role "supervisor": set by proxy/server/workers.py
        self.secrets = secrets
        self._loader = loader  # reads the config again for SIGHUP / POST /admin/reload
        self.periods = config.budgets.periods
        self.budgets = BudgetBook(config.budget_map(), self.periods)
        self.metrics = Metrics(config.attribution, config.prices.models)
        self.metrics.budgets = self.budgets
        self._hard_pusd = _hard_budgets(config)  # what a shared ledger admits against
        self.ledger: Ledger = ledger or open_ledger(
            config.ledger,
            file=config.file,
            on_commit=self.metrics.on_commit,
            on_terminal=self._on_terminal,
            hard_limits=lambda: self._hard_pusd,
        )
        self._budget_sync: asyncio.Task[None] | None = None
        self.notifier = Notifier(config.notify, self.ledger)
        self.upstream = Upstreams(config.upstream, secrets.together_key)
        self.relay = Relay(
            config,
            KeyStore(config.key_index()),
            self.upstream,
            self.ledger,
            self.metrics,
            tokenizer or Tokenizer.lazy(),  # loaded on first need, off the loop
            self.budgets,
            clock,
        )
        self.clock = clock
        self.batch_tracker = BatchTracker(
            self.ledger,
            self.upstream,
            lambda: self.config,
            self.periods,
            self.relay.tokenizer,
        )
        self.video_tracker = VideoTracker(
            self.ledger,
            self.upstream,
            lambda: self.config,
            self.periods,
            self.budgets,
            follow=role != "supervisor",  # a supervisor only holds the running jobs' bounds
        )
        # dedicated endpoints by the minute: one follower per process group (not in each worker)
        self.dedicated = DedicatedFollower(
            self.ledger, self.upstream.api, lambda: self.config, self.periods, clock
        )
        self.metrics.dedicated = self.dedicated.metrics
        self.public_app = self._build_public_app()
        self.admin_app = build_admin_app(self)
        self._runners: list[web.AppRunner] = []
        self.port = 0
        self.admin_port = 0

    def _build_public_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.limits.max_body_bytes, handler_args={"max_field_size": 16384}
        )
        app[RELAY_KEY] = self.relay
        passthrough = Passthrough(self.relay)
        key = token_key(self.secrets.together_key)  # upload tokens: every worker and replica has it
        uploads = UploadRelay(self.relay, passthrough, self.ledger, ObjectStore(self.upstream.api), key)
        videos = self.video_tracker
        objects = ObjectGateway(self.relay, passthrough, self.ledger, self.batch_tracker, uploads, videos)
        dispatcher = Dispatcher(self.relay, objects, passthrough, UnitRelay(self.relay, self.ledger, videos))
        for path, endpoint in ENDPOINTS.items():  # the hot path: aiohttp's router finds these
            app.router.add_post(path, _inference(self.relay, dispatcher, path, endpoint))
            # ... also as a together SDK 3.x client given `http://proxy/v1` sends them
            # (routes.undouble_version serves the other doubled paths)
            app.router.add_post("/v1" + path, _inference(self.relay, dispatcher, "/v1" + path, endpoint))
        # everything else, and any target aiohttp would decode or normalise, goes through the
        # route table (`[\s\S]`: a decoded line break must not fall to aiohttp's own 404)
        app.router.add_route("*", "/{tail:[\\s\\S]*}", dispatcher.handle)
        return app

    def _on_terminal(self, row: LedgerRow) -> None:
        """A row became terminal (committed): count it, settle its budget, notify crossings."""
        self.metrics.record(row)
        crossings = self.budgets.settle(row)
        if crossings:
            self.notifier.enqueue(crossings, self._hard_limits())

    async def load_spend(self) -> None:
        """Spend of the current period from the ledger (I7: recomputed, not remembered).

        Called at start, before any traffic; later month changes roll over in memory.
        """
        period = self.periods.of(self.clock())
        if isinstance(self.ledger, PostgresLedger):  # its accounts hold the sums of the rows
            self.budgets.reset(period, ())
            self.budgets.refresh(period, await self.ledger.account_spend(period))
        else:
            self.budgets.reset(period, await self.ledger.period_costs(period))
        for tenant, feature, threshold in await self.ledger.notifications(period):
            self.budgets.mark_notified(tenant, feature, [Decimal(threshold)])
        self.notifier.enqueue(self.budgets.due(), self._hard_limits())

    def _hard_limits(self) -> dict[tuple[str, str | None], bool]:
        return {k: b.hard_limit for k, b in self.config.budget_map().items()}

    async def _sync_budgets(self, ledger: PostgresLedger) -> None:
        """Replicas share the ledger: every second, take the spend of all of them from its
        accounts into the local book (gauges, /admin/budgets, the local pre-check, alerts)."""
        while True:
            await asyncio.sleep(BUDGET_SYNC_INTERVAL)
            period = self.periods.of(self.clock())
            try:
                spent = await ledger.account_spend(period)
            except LedgerUnavailable:
                continue  # readiness already says so; the next round tries again
            self.budgets.refresh(period, spent)
            self.notifier.enqueue(self.budgets.due(), self._hard_limits())

    async def reload(self) -> dict[str, object]:
        """Re-read the config: keys, tenants, budgets and prices change without a restart."""
        if self._loader is None:
            raise ConfigError(self.config.file, "", "this proxy was started without a config file")
        new = self._loader()  # ConfigError propagates: the running config stays
        restart = [
            name
            for name in ("listen", "admin", "upstream", "ledger", "limits", "attribution")
            if getattr(new, name) != getattr(self.config, name)
        ]
        keep: dict[str, Any] = {n: getattr(self.config, n) for n in restart}
        if new.budgets.timezone != self.periods.timezone:  # periods are cut at start only
            restart.append("budgets.timezone")
            keep["budgets"] = replace(new.budgets, timezone=self.periods.timezone)
        self.config = replace(new, **keep)
        self.relay.reconfigure(self.config, KeyStore(self.config.key_index()))
        self.budgets.configure(self.config.budget_map())
        self._hard_pusd = _hard_budgets(self.config)
        self.notifier.settings = self.config.notify
        self.metrics.set_models(self.config.prices.models)
        self.notifier.enqueue(self.budgets.due(), self._hard_limits())
        if restart:
            log.warning("config reloaded; these sections need a restart to change: %s", restart)
        else:
            log.info("config reloaded from %s", self.config.file)
        result: dict[str, object] = {
            "reloaded": True,
            "tenants": len(self.config.tenants),
            "restart_required": restart,
        }
        if self.fleet is not None:  # this config is valid: every worker reloads it too
            result["workers"] = await self.fleet.reload()
        return result

    def _runner(self, app: web.Application, drain: float) -> web.AppRunner:
        """A runner whose connections must send their request head within limits.header_timeout."""
        listener = "public" if app is self.public_app else "admin"
        return HeadDeadlineRunner(
            app,
            header_timeout=self.config.limits.header_timeout,
            on_timeout=lambda: self.metrics.header_timeout(listener),
            on_malformed=lambda: self.metrics.malformed_request(listener),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=drain,
        )

    async def start(self) -> None:
        await self.ledger.open()
        await self.upstream.start()
        self.relay.loop = asyncio.get_running_loop()
        await self.notifier.start()
        await self.load_spend()
        if isinstance(self.ledger, PostgresLedger):
            self._budget_sync = asyncio.get_running_loop().create_task(self._sync_budgets(self.ledger))
        if self.role != "supervisor":  # a supervisor forwards nothing: its workers do
            await self.batch_tracker.start()  # picks up batches a previous run left unrecorded
        await self.video_tracker.start()  # holds (and follows) the video jobs still running
        if self.role != "worker":
            await self.dedicated.start()
        synced = self.config.prices.extra.get("synced_at")
        if synced is not None:
            self.metrics.prices_last_sync = _timestamp(synced)
        drain = self.config.limits.drain_timeout
        public, admin = (self.public_app, self.config.listen), (self.admin_app, self.config.admin)
        listeners = {"single": (public, admin), "worker": (public,), "supervisor": (admin,)}[self.role]
        for app, listen in listeners:
            runner = self._runner(app, drain)
            await runner.setup()
            site = web.TCPSite(
                runner,
                listen.host,
                listen.port,
                backlog=2048,
                reuse_address=True,
                reuse_port=self.role == "worker",  # the kernel spreads connections over the workers
            )
            await site.start()
            self._runners.append(runner)
            if app is self.public_app:
                self.port = _bound_port(runner)
            else:
                self.admin_port = _bound_port(runner)
        if self.fleet is not None:
            await self.fleet.start()  # it says where the workers listen
        elif self.role == "worker":
            log.info("worker listening on http://%s:%d/v1 (SO_REUSEPORT)", self.config.listen.host, self.port)
        else:
            log.info(
                "together-meter listening on http://%s:%d/v1 (admin http://%s:%d), upstream %s",
                self.config.listen.host,
                self.port,
                self.config.admin.host,
                self.admin_port,
                self.config.upstream.url,
            )

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish (drain timeout), close the ledger."""
        self.relay.accepting = False
        if self.fleet is not None:  # the workers drain first; /metrics stays up meanwhile
            await self.fleet.stop()
        # aiohttp waits drain_timeout for handlers, then cancels them bare: we stop them first
        # so a cut stream still gets its error event and its `shutdown_aborted` row
        loop = asyncio.get_running_loop()
        abort = loop.call_later(self.config.limits.drain_timeout, self.relay.abort_in_flight)
        try:
            for runner in self._runners:
                await runner.cleanup()
        finally:
            abort.cancel()
        self._runners.clear()
        await self.batch_tracker.stop()
        await self.video_tracker.stop()
        await self.dedicated.stop()
        await self.upstream.close()
        if self._budget_sync is not None:
            self._budget_sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._budget_sync
            self._budget_sync = None
        await self.ledger.close()
        await self.notifier.stop()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[None]] = set()
        loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(reloads, self._reload_logged()))
        await self.start()
        _settle_heap()
        try:
            await stop.wait()
        finally:
            log.info(
                "shutting down: draining in-flight requests (up to %.0f s)", self.config.limits.drain_timeout
            )
            await self.stop()

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)


def _settle_heap() -> None:
    """A serving process: what start built (modules, config, price table) lives as long as the
    process, so the garbage collector stops scanning it (freeze); and young objects are collected
    every GC_YOUNG_THRESHOLD allocations instead of 700 (a request makes a few dozen, nearly all
    freed with it). Together ~5-8 % of the CPU per request (docs/benchmarks.md)."""
    gc.collect()  # nothing unreachable gets frozen
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)


def _hard_budgets(config: Config) -> dict[tuple[str, str | None], int]:
    """(tenant, feature) -> monthly pico-USD of every hard-limit budget."""
    return {k: b.monthly_pusd for k, b in config.budget_map().items() if b.hard_limit}


def _spawn(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _inference(
    relay: Relay, dispatcher: Dispatcher, path: str, endpoint: str
) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
    """The handler of one inference route: the plain path goes straight to the relay; a target
    aiohttp routed here after decoding or normalising it (`/v1/x/../chat/completions`, escapes,
    a query) is validated by the dispatcher first."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.raw_path == path:
            return await relay.handle(request, endpoint)
        return await dispatcher.handle(request)

    return handle


def _bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    return 0


def _timestamp(value: object) -> float | None:
    import datetime as dt

    try:
        when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def with_overrides(
    config: Config,
    *,
    upstream: str | None = None,
    port: int | None = None,
    admin_port: int | None = None,
    ledger_path: str | Path | None = None,
) -> Config:
    """The config with command-line overrides applied."""
    if upstream:
        # every route to that URL: a configured inference host is left out too
        config = replace(
            config, upstream=replace(config.upstream, url=upstream.rstrip("/"), inference_url=None)
        )
    if port is not None:
        config = replace(config, listen=replace(config.listen, port=port))
    if admin_port is not None:
        config = replace(config, admin=replace(config.admin, port=admin_port))
    if ledger_path is not None:
        config = replace(config, ledger=replace(config.ledger, path=str(ledger_path)))
    return config
