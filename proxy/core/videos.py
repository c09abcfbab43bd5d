"""A video job's ledger row, decided from together's answer about the job (pure).

together bills a video job when it completes, for the seconds it produced, and never a failed
one (its VideoJob: `status` in_progress | completed | failed, `seconds` a decimal string). The
proxy remembers each job a tenant creates (records.VideoJob) and, when it sees the job's end,
records one row keyed `video_<id>`, so seeing the end twice (two replicas, a restart between the
row and the `recorded` mark) adds nothing:

  completed   ok, the job's `seconds` (else the request's, `derived`; else the default,
              `estimated`) at the model's per-second price (unknown, NULL, when it has none)
  failed      upstream_error, 0 seconds, cost 0 (together bills nothing)
  gone (404)  orphaned at the job's reservation, `estimated`: together no longer says whether it
              billed the job, so the bound is charged (like a row a crashed process left in flight)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.core.pricing import SERVERLESS, Rates, unit_cost_pusd
from proxy.core.records import LedgerRow, VideoJob
from proxy.core.units import DEFAULT_VIDEO_SECONDS, MICRO, Quantity, decimal_micros

RUNNING = "in_progress"
BILLED = frozenset({"completed", "succeeded"})
NOT_BILLED = frozenset({"failed", "cancelled", "canceled", "expired"})
GONE = "not_found"  # the proxy's own mark: together answered 404 for the job


def video_request_id(video_id: str) -> str:
    """The ledger key of a video job's row: the same on every look."""
    return f"video_{video_id}"


def job_status(answer: Any) -> str | None:
    """The `status` of a VideoJob answer (lower case), None if it has none."""
    status = answer.get("status") if isinstance(answer, dict) else None
    return status.lower() if isinstance(status, str) and len(status) <= 64 else None


def is_final(status: str | None) -> bool:
    return status in BILLED or status in NOT_BILLED


@dataclass(frozen=True, slots=True)
class VideoEnd:
    """How a job ended, as the ledger records it."""

    status: str  # ok | upstream_error | orphaned
    quantity: Quantity
    upstream_status: int | None
    error_code: str | None = None


def video_end(answer: Any, job: VideoJob) -> VideoEnd | None:
    """The end of `job` that together's `answer` (a VideoJob) tells; None while it still runs."""
    status = job_status(answer)
    if status in BILLED:
        return VideoEnd("ok", completed_quantity(answer, job), 200)
    if status in NOT_BILLED:
        return VideoEnd("upstream_error", Quantity("video_second", 0, "upstream"), 200, "video_failed")
    return None


def gone_end(job: VideoJob) -> VideoEnd:
    """together no longer knows the job (404): charged at its bound."""
    asked = job.seconds_micros if job.seconds_micros is not None else DEFAULT_VIDEO_SECONDS * MICRO
    return VideoEnd("orphaned", Quantity("video_second", asked, "estimated"), 404, "video_not_found")


def completed_quantity(answer: Any, job: VideoJob) -> Quantity:
    """Seconds a completed job is billed for: the job's `seconds`, else the request's."""
    stated = decimal_micros(answer.get("seconds")) if isinstance(answer, dict) else None
    if stated is not None:
        return Quantity("video_second", stated, "upstream")
    if job.seconds_micros is not None:
        return Quantity("video_second", job.seconds_micros, "derived")
    return Quantity("video_second", DEFAULT_VIDEO_SECONDS * MICRO, "estimated")


def video_cost(end: VideoEnd, job: VideoJob, rates: Rates | None) -> int | None:
    """pico-USD of the row: 0 for a failed job, the bound for a vanished one, else the seconds
    at the per-second price (None: no price for video seconds)."""
    if end.status == "upstream_error":
        return 0
    if end.status == "orphaned":
        return job.reserved_pusd
    if rates is None or rates.unit != "video_second":
        return None
    return unit_cost_pusd(end.quantity.micros, rates)


def video_row(job: VideoJob, end: VideoEnd, rates: Rates | None, now: int, period: str) -> LedgerRow:
    """The job's terminal row, dated when its end was seen (when its cost became known)."""
    return LedgerRow(
        video_request_id(job.video_id),
        job.tenant,
        job.key_id,
        job.model,
        "videos",
        SERVERLESS,
        job.feature,
        job.environment,
        False,
        now,
        period,
        status=end.status,
        finished_us=now,
        upstream_status=end.upstream_status,
        usage_source=end.quantity.source,
        cost_pusd=video_cost(end, job, rates),
        reserved_pusd=0,  # the job's hold is released by the tracker, not by this row
        stream_complete=end.status == "ok",
        error_code=end.error_code,
        upstream_id=job.video_id,
        unit="video_second",
        quantity_micros=end.quantity.micros,
    )


__all__ = [
    "GONE",
    "RUNNING",
    "VideoEnd",
    "completed_quantity",
    "gone_end",
    "is_final",
    "job_status",
    "video_cost",
    "video_end",
    "video_request_id",
    "video_row",
]
