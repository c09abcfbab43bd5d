"""The built-in budget webhook: one POST per tenant (and feature) per threshold per period.

Crossings are queued by the request path and delivered by one background task, retried with
exponential backoff; nothing on the request path ever waits for a webhook. A delivery is
recorded in the ledger (table `notifications`) only once the receiver answered 2xx, so a
notification lost to a crash is sent again after the restart: delivery is at least once (a crash
between the receiver's 2xx and the ledger write sends it once more). With a ledger shared by
several replicas, a message is claimed in the ledger before it is sent, so one replica sends it
(a claim whose replica died is taken over after the ledger lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.config import Notify
from proxy.core.budgets import Crossing
from proxy.core.pricing import format_usd

log = logging.getLogger(__name__)
FIRST_BACKOFF = 0.5  # seconds; doubled after every failed attempt


class NotificationStore(Protocol):
    async def claim_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> bool: ...

    async def release_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> None: ...

    async def record_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> bool: ...


def payload(c: Crossing, hard_limit: bool) -> dict[str, Any]:
    """The JSON body a webhook receives (documented in docs/budgets.md)."""
    return {
        "event": "budget_threshold",
        "tenant": c.tenant,
        "feature": c.feature,
        "period": c.period,
        "threshold": float(c.threshold),
        "budget_usd": format_usd(c.budget_pusd),
        "spent_usd": format_usd(c.spent_pusd),
        "remaining_usd": format_usd(c.budget_pusd - c.spent_pusd),
        "hard_limit": hard_limit,
        "sent_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


class Notifier:
    """Queue of threshold crossings and the task that delivers them."""

    def __init__(self, settings: Notify, store: NotificationStore) -> None:
        self.settings = settings
        self.store = store
        self._queue: asyncio.Queue[tuple[Crossing, bool]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0

    def enqueue(self, crossings: list[Crossing], hard_limit: dict[tuple[str, str | None], bool]) -> None:
        if not self.settings.webhook_url:
            return
        for c in crossings:
            self._queue.put_nowait((c, hard_limit.get((c.tenant, c.feature), False)))

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="budget-webhook")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain(self, within: float = 10.0) -> None:
        """Wait until everything queued so far was delivered or given up (tests, shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._queue.join()

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                crossing, hard = await self._queue.get()
                try:
                    await self._deliver(session, crossing, hard)
                except Exception:  # e.g. the ledger could not record it: keep serving the queue
                    self.failed += 1
                    log.exception(
                        "budget webhook for %s threshold %s failed", crossing.tenant, crossing.threshold
                    )
                finally:
                    self._queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, c: Crossing, hard: bool) -> None:
        assert self.settings.webhook_url
        key = (c.tenant, c.feature, c.period, str(c.threshold))
        if not await self.store.claim_notification(*key):
            return  # sent already, or another replica sharing the ledger is sending it
        body = orjson.dumps(payload(c, hard))
        delay = FIRST_BACKOFF
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                async with session.post(
                    self.settings.webhook_url,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.settings.timeout),  # follows reloads
                ) as resp:
                    if 200 <= resp.status < 300:
                        await self.store.record_notification(*key)
                        self.delivered += 1
                        return
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            log.warning(
                "budget webhook for %s threshold %s failed (attempt %d/%d): %s",
                c.tenant,
                c.threshold,
                attempt,
                self.settings.max_attempts,
                reason,
            )
            if attempt < self.settings.max_attempts:
                await asyncio.sleep(delay)
                delay *= 2
        self.failed += 1
        await self.store.release_notification(*key)
        log.error(
            "budget webhook for %s threshold %s given up; it is retried after a restart",
            c.tenant,
            c.threshold,
        )
