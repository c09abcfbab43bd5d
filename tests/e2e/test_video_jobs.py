"""Video jobs are metered when they end, as together bills them: a completed job once for its
seconds, a failed one never; the job's bound is held against the budget while it runs, across a
restart; the row is recorded whether or not the client ever looks at the job again. Real together
SDK against the simulator (which bills a job at completion, and never a failed one)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from together import AsyncTogether

from proxy.config import Config
from proxy.core.budgets import Budget
from proxy.core.videos import video_request_id
from proxy.ledger import LedgerRow
from proxy.simulator import billed_pusd
from proxy.simulator.media import MEDIA

from .support import Meter, StartMeter, error_of, post_raw
from .test_budgets import budgets_view

VEO = "google/veo-3.0"  # $0.40 per second of video (config/prices.yaml)
PER_SECOND = 400_000_000_000  # pico-USD
WAIT_S = 10.0


def slow_polls(config: Config) -> Config:
    """The tracker looks only when poked (a client's retrieve), so each test decides when."""
    return replace(config, batches=replace(config.batches, poll_interval=3600.0))


def fast_polls(config: Config) -> Config:
    return replace(config, batches=replace(config.batches, poll_interval=0.05))


def with_budget(usd: str) -> Callable[[Config], Config]:
    def change(config: Config) -> Config:
        tenants = dict(config.tenants)
        pusd = int(Decimal(usd).scaleb(12))
        tenants["acme"] = replace(tenants["acme"], budget=Budget(pusd, hard_limit=True))
        return slow_polls(replace(config, tenants=tenants))

    return change


def sdk(meter: Meter) -> AsyncTogether:
    return AsyncTogether(api_key=meter.keys["acme"], base_url=meter.origin, max_retries=0, timeout=20)


@pytest.fixture
async def tog(meter: Meter) -> AsyncIterator[AsyncTogether]:
    async with sdk(meter) as c:
        yield c


async def create(tog: AsyncTogether, seconds: str, delay_ms: int, **simulate: Any) -> Any:
    return await tog.videos.create(
        model=VEO, prompt="a meter", seconds=seconds,
        extra_body={"simulate": {"video_delay_ms": delay_ms, **simulate}},
    )  # fmt: skip


async def retrieve_until_ended(tog: AsyncTogether, video_id: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:  # bounded by WAIT_S
        job = await tog.videos.retrieve(video_id)
        if job.status != "in_progress" or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.02)


async def job_row(meter: Meter, video_id: str) -> LedgerRow:
    """The job's own row, once recorded (bounded wait)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        found = [r for r in await meter.rows() if r.request_id == video_request_id(video_id)]
        if found:
            (row,) = found
            return row
        assert time.monotonic() < deadline, "the video job's row was never recorded"
        await asyncio.sleep(0.05)


async def budget_until(meter: Meter, **want: str) -> dict[str, Any]:
    """acme's budget once it shows `want` (spent=..., reserved=...): a shared ledger's view
    follows its database within its sync interval (bounded wait)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        view: dict[str, Any] = (await budgets_view(meter))["tenants"]["acme"]["budget"]
        if all(view[f"{k}_usd"] == v for k, v in want.items()) or time.monotonic() > deadline:
            assert {k: view[f"{k}_usd"] for k in want} == want
            return view
        await asyncio.sleep(0.05)


def sim_videos(meter: Meter) -> dict[str, dict[str, Any]]:
    """The simulator's video jobs (together's side)."""
    return meter.sim.app[MEDIA].videos


def sim_bills(meter: Meter) -> list[dict[str, Any]]:
    return [e for e in meter.sim.billed.entries if e.get("video_id")]


async def test_a_completed_job_is_recorded_once_at_completion_for_its_seconds(
    start_meter: StartMeter,
) -> None:
    async with start_meter(change=slow_polls) as meter, sdk(meter) as tog:
        raw = await tog.videos.with_raw_response.create(
            model=VEO, prompt="a meter", seconds="4.5", extra_body={"simulate": {"video_delay_ms": 200}}
        )
        job = await raw.parse()
        (created,) = await meter.wait_terminal(1)
        # the create call itself is not billed: its row costs 0, and nothing is billed yet
        assert (created.endpoint, created.status, created.cost_pusd, created.quantity_micros) == (
            "videos.create", "ok", 0, 0,
        )  # fmt: skip
        assert raw.headers["x-meter-cost-usd"] == "0" and created.request_id == raw.headers["x-request-id"]
        assert sim_bills(meter) == []
        done = await retrieve_until_ended(tog, job.id)
        assert done.status == "completed"
        row = await job_row(meter, job.id)
        (bill,) = sim_bills(meter)
        assert (row.endpoint, row.status, row.unit, row.usage_source, row.tenant, row.upstream_id) == (
            "videos", "ok", "video_second", "upstream", "acme", job.id,
        )  # fmt: skip
        assert row.quantity_micros == 4_500_000
        assert row.cost_pusd == billed_pusd(bill) == 45 * PER_SECOND // 10
        # seen again (the tracker's own look, another retrieve): still one row
        await meter.proxy.video_tracker.poll_once()
        await tog.videos.retrieve(job.id)
        await asyncio.sleep(0.2)
        rows = [r for r in await meter.rows() if r.endpoint == "videos"]
        assert [r.request_id for r in rows] == [video_request_id(job.id)]


async def test_a_failed_job_costs_nothing(start_meter: StartMeter) -> None:
    async with start_meter(change=slow_polls) as meter, sdk(meter) as tog:
        job = await create(tog, "6", 50, fail=True)
        done = await retrieve_until_ended(tog, job.id)
        assert done.status == "failed"
        row = await job_row(meter, job.id)
        assert (row.status, row.cost_pusd, row.quantity_micros, row.error_code) == (
            "upstream_error", 0, 0, "video_failed",
        )  # fmt: skip
        assert sim_bills(meter) == []  # together bills no failed job; the simulator neither
        assert sum(r.cost_pusd or 0 for r in await meter.rows()) == 0


async def test_a_job_nobody_looks_at_is_recorded_by_the_tracker(start_meter: StartMeter) -> None:
    async with start_meter(change=fast_polls) as meter, sdk(meter) as tog:
        job = await create(tog, "2", 100)
        row = await job_row(meter, job.id)  # the client never retrieves it
        (bill,) = sim_bills(meter)
        assert row.cost_pusd == billed_pusd(bill) == 2 * PER_SECOND


async def test_a_running_job_holds_its_bound_against_a_hard_budget(start_meter: StartMeter) -> None:
    async with start_meter(change=with_budget("3")) as meter, sdk(meter) as tog:
        first = await create(tog, "4.5", 300)  # bound $1.80 of $3
        view = (await budgets_view(meter))["tenants"]["acme"]["budget"]
        assert view["reserved_usd"] == "1.8" and view["spent_usd"] == "0"
        status, _, body = await post_raw(
            meter.origin + "/v2/videos",
            {"model": VEO, "prompt": "again", "seconds": "4.5"},
            {**meter.auth("acme"), "Content-Type": "application/json"},
        )
        assert status == 429 and error_of(body)["code"] == "budget_exceeded"
        assert len(sim_bills(meter)) == 0 and len(sim_videos(meter)) == 1
        await retrieve_until_ended(tog, first.id)
        await job_row(meter, first.id)
        view = await budget_until(meter, spent="1.8", reserved="0")
        await create(tog, "3", 60_000)  # $1.20: fits in what is left
        view = (await budgets_view(meter))["tenants"]["acme"]["budget"]
        assert (view["reserved_usd"], view["remaining_usd"]) == ("1.2", "0")


async def test_a_job_running_across_a_restart_is_held_and_recorded_once(start_meter: StartMeter) -> None:
    async with start_meter(change=with_budget("10")) as meter:
        async with sdk(meter) as tog:
            job = await create(tog, "5", 400)
        await meter.restart()  # the job is still running upstream
        view = (await budgets_view(meter))["tenants"]["acme"]["budget"]
        assert view["reserved_usd"] == "2"  # held again from the ledger
        async with sdk(meter) as tog:
            assert (await retrieve_until_ended(tog, job.id)).status == "completed"
        row = await job_row(meter, job.id)
        (bill,) = sim_bills(meter)
        assert row.cost_pusd == billed_pusd(bill) == 5 * PER_SECOND
        await budget_until(meter, spent="2", reserved="0")


async def test_a_job_the_upstream_forgot_is_charged_its_bound(start_meter: StartMeter) -> None:
    async with start_meter(change=slow_polls) as meter, sdk(meter) as tog:
        job = await create(tog, "3", 60_000)
        sim_videos(meter).pop(job.id)  # together answers 404 for it from now on
        await meter.proxy.video_tracker.poll_once()
        row = await job_row(meter, job.id)
        assert (row.status, row.usage_source, row.error_code, row.cost_pusd) == (
            "orphaned", "estimated", "video_not_found", 3 * PER_SECOND,
        )  # fmt: skip


@pytest.mark.sqlite_only
async def test_a_job_the_ledger_cannot_remember_is_charged_at_creation(start_meter: StartMeter) -> None:
    """Never less: with `video_jobs` gone (a real fault in the file), the job cannot be followed,
    so its create call is charged the asked seconds."""
    async with start_meter(change=slow_polls) as meter, sdk(meter) as tog:
        with sqlite3.connect(meter.ledger_path) as conn:
            conn.execute("DROP TABLE video_jobs")
        job = await create(tog, "2.5", 60_000)
        (row,) = await meter.wait_terminal(1)
        assert (row.endpoint, row.status, row.upstream_id, row.quantity_micros) == (
            "videos.create", "ok", job.id, 2_500_000,
        )  # fmt: skip
        assert row.cost_pusd == 25 * PER_SECOND // 10
