"""together.ai video jobs: metered when they end, as together bills them.

A video job is created through the proxy (media.py: the create call's own row costs 0) and
remembered in the ledger's `video_jobs`. `VideoTracker` follows every job not yet recorded to its
end, whether or not the client ever asks for it again, and records the job's one row
(proxy/core/videos.py: completed -> the seconds at the model's price; failed -> 0). A client
that reads its job through the proxy and sees it ended wakes the tracker at once.

Until a job ends, its bound counts against the tenant's budget: every process (each worker and
replica) holds the bounds of the jobs the ledger lists as running (BudgetBook.hold_jobs), read
again at every look, so a job created elsewhere is held here within one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from proxy.config import Config
from proxy.core.budgets import BudgetBook, Periods
from proxy.core.routes import ID_RE
from proxy.core.videos import GONE, VideoEnd, gone_end, is_final, job_status, video_end, video_row
from proxy.errors import MeterError, UpstreamProtocolError, UpstreamTimeout
from proxy.ledger import LedgerRow, LedgerUnavailable, VideoJob, now_us
from proxy.upstream.client import UpstreamStreamError
from proxy.upstream.hosts import Upstreams

log = logging.getLogger(__name__)


class VideoStore(Protocol):
    """What video metering needs from the ledger (both backends have it)."""

    async def add_video(self, job: VideoJob) -> bool: ...

    async def update_video(self, video_id: str, status: str, recorded_us: int | None) -> bool: ...

    async def videos(self, *, unrecorded: bool = False) -> list[VideoJob]: ...

    async def record(self, row: LedgerRow) -> bool: ...


class VideoTracker:
    """Background task: follows running video jobs and records each one's row at its end."""

    def __init__(
        self,
        store: VideoStore,
        upstream: Upstreams,
        config: Callable[[], Config],
        periods: Periods,
        budgets: BudgetBook,
        *,
        follow: bool = True,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.config = config  # a getter: prices and the interval follow config reloads
        self.periods = periods
        self.budgets = budgets
        self.following = follow  # False (a supervisor): only hold the running jobs' bounds
        self.running: dict[str, VideoJob] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Hold the bounds of the jobs a previous run left running, then follow them."""
        with contextlib.suppress(Exception):
            await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="video-tracker")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def poke(self) -> None:
        """Look at the jobs now rather than at the next interval."""
        self._wake.set()

    def seen(self, data: bytes) -> None:
        """A client read a job through the proxy: if it ended, record it now."""
        if is_final(job_status(_json(data))):
            self.poke()

    async def add(self, job: VideoJob) -> None:
        """A job just created: remember it (raises if the ledger cannot) and hold its bound."""
        await self.store.add_video(job)
        self.running[job.video_id] = job
        self._hold()

    async def refresh(self) -> None:
        """The running jobs as the ledger lists them (every process's), their bounds held."""
        self.running = {j.video_id: j for j in await self.store.videos(unrecorded=True)}
        self._hold()

    def _hold(self) -> None:
        self.budgets.hold_jobs((j.tenant, j.feature, j.reserved_pusd or 0) for j in self.running.values())

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # the upstream or the ledger is down: try again next time
                log.exception("videos: polling failed; retrying in %g s", self.interval())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval()):
                    await self._wake.wait()

    def interval(self) -> float:
        return self.config().batches.poll_interval

    async def poll_once(self) -> int:
        """One look at every running job; the number of jobs recorded by this call."""
        await self.refresh()
        if not self.following:
            return 0
        done = 0
        for job in list(self.running.values()):
            try:
                done += await self.follow(job)
            except (MeterError, LedgerUnavailable) as exc:
                log.warning("videos: %s stays open: %s", job.video_id, exc)
        if done:
            await self.refresh()
        return done

    async def follow(self, job: VideoJob) -> bool:
        """One look at one job; True when it ended and its row is recorded."""
        if not ID_RE.match(job.video_id):  # ids come from the upstream; never trust a path part
            await self.store.update_video(job.video_id, "invalid_id", now_us())
            return True
        status_code, data = await self._get(f"/v2/videos/{job.video_id}")
        if status_code == 404:
            log.error("videos: the upstream no longer knows %s; charged at its bound", job.video_id)
            return await self._record(job, gone_end(job), GONE)
        if status_code != 200:
            raise UpstreamProtocolError(f"GET /v2/videos/{job.video_id} answered {status_code}")
        answer = _json(data)
        end = video_end(answer, job)
        status = job_status(answer) or job.status
        if end is None:
            if status != job.status:
                await self.store.update_video(job.video_id, status, None)
            return False
        return await self._record(job, end, status)

    async def _record(self, job: VideoJob, end: VideoEnd, status: str) -> bool:
        now = now_us()
        rates = self.config().prices.get(job.model)
        made = await self.store.record(video_row(job, end, rates, now, self.periods.of(now)))
        await self.store.update_video(job.video_id, status, now)
        self.running.pop(job.video_id, None)
        self._hold()
        if made:
            log.info("videos: %s %s, recorded for %s", job.video_id, status, job.tenant)
        return True

    async def _get(self, path: str) -> tuple[int, bytes]:
        config = self.config()
        up = await self.upstream.request("GET", path, body=None, incoming={})
        try:
            async with up, asyncio.timeout(config.upstream.idle_timeout):
                return up.status, await up.read(config.limits.max_response_bytes)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The upstream stopped sending {path}.") from exc
        except UpstreamStreamError as exc:
            raise UpstreamProtocolError(f"{path} broke off: {exc}") from exc


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


__all__ = ["VideoStore", "VideoTracker"]
