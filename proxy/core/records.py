"""Ledger records as values: one row per inbound request, batch jobs and owned files.

Pure (no I/O): the ledger backends (proxy/ledger/) store these; reports, budgets and retention
compute over them.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, fields
from typing import Any, Final

IN_FLIGHT = "in_flight"
TERMINAL_STATUSES = (
    "ok",
    "client_aborted",
    "upstream_aborted",
    "upstream_error",
    "upstream_timeout",
    "rejected",
    "shutdown_aborted",
    "orphaned",
)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the ledger's `requests` table, as both backends declare it."""

    name: str
    kind: str  # text | int (64-bit) | int4 | bool
    not_null: bool = False
    default: str | None = None  # an SQL literal
    key: bool = False


# The ledger's columns, in LedgerRow order: the one source the SQLite schema is made from, the
# PostgreSQL writer's array types follow, and the PostgreSQL migrations are checked against
# (tests/test_ledger_schema.py). PostgreSQL has one more, `owner` (the writing instance).
LEDGER_COLUMNS = (
    Column("request_id", "text", True, key=True),
    Column("tenant", "text", True),
    Column("key_id", "text", True),
    Column("model", "text", True),
    Column("endpoint", "text", True),
    Column("mode", "text", True),
    Column("feature", "text"),
    Column("environment", "text"),
    Column("stream", "bool", True),
    Column("started_us", "int", True),
    Column("finished_us", "int"),
    Column("period", "text", True),
    Column("upstream_status", "int4"),
    Column("prompt_tokens", "int"),
    Column("completion_tokens", "int"),
    Column("cached_tokens", "int"),
    Column("reasoning_tokens", "int"),
    Column("usage_source", "text", True),
    Column("cost_pusd", "int"),
    Column("reserved_pusd", "int"),
    Column("status", "text", True),
    Column("stream_complete", "bool", True, "false"),
    Column("error_code", "text"),
    Column("upstream_id", "text"),
    Column("unit", "text", True, "'token'"),
    Column("quantity_micros", "int"),
)
COLUMNS = tuple(c.name for c in LEDGER_COLUMNS)
# what a terminal row's `finish` sets (a begun row's other columns never change again)
FINISH_COLUMNS = (
    "status",
    "finished_us",
    "upstream_status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_source",
    "cost_pusd",
    "stream_complete",
    "error_code",
    "upstream_id",
    "unit",
    "quantity_micros",
)
# the unit of a row priced by tokens (chat, completions, embeddings, rerank): its quantities are
# the token columns; every other unit's quantity is `quantity_micros` (millionths of the unit)
TOKEN = "token"


# Read-only through Final (the type checker refuses any assignment) rather than frozen=True: two
# rows are built per request, and a frozen dataclass sets each of these 26 fields through
# object.__setattr__, about 8 times the cost of a plain slotted __init__. Hashable as before.
@dataclass(slots=True, unsafe_hash=True)
class LedgerRow:
    """One request as the ledger keeps it. Money in pico-USD; times in µs since the epoch."""

    request_id: Final[str]
    tenant: Final[str]
    key_id: Final[str]
    model: Final[str]
    endpoint: Final[str]
    mode: Final[str]
    feature: Final[str | None]
    environment: Final[str | None]
    stream: Final[bool]
    started_us: Final[int]
    period: Final[str]
    status: Final[str] = IN_FLIGHT
    finished_us: Final[int | None] = None
    upstream_status: Final[int | None] = None
    prompt_tokens: Final[int | None] = None
    completion_tokens: Final[int | None] = None
    cached_tokens: Final[int | None] = None
    reasoning_tokens: Final[int | None] = None
    usage_source: Final[str] = "none"
    cost_pusd: Final[int | None] = None
    reserved_pusd: Final[int | None] = 0  # None: an unpriced model, so no bound is known
    stream_complete: Final[bool] = False
    error_code: Final[str | None] = None
    upstream_id: Final[str | None] = None
    unit: Final[str] = TOKEN
    quantity_micros: Final[int | None] = None  # the quantity in millionths of `unit` (NULL for tokens)

    def values(self) -> tuple[Any, ...]:
        """The row in COLUMNS order."""
        # spelled out: this runs twice per request
        return (
            self.request_id,
            self.tenant,
            self.key_id,
            self.model,
            self.endpoint,
            self.mode,
            self.feature,
            self.environment,
            self.stream,
            self.started_us,
            self.finished_us,
            self.period,
            self.upstream_status,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
            self.usage_source,
            self.cost_pusd,
            self.reserved_pusd,
            self.status,
            self.stream_complete,
            self.error_code,
            self.upstream_id,
            self.unit,
            self.quantity_micros,
        )

    def terminal(
        self,
        status: str,
        *,
        upstream_status: int | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        usage_source: str = "none",
        cost_pusd: int | None = None,
        stream_complete: bool = False,
        error_code: str | None = None,
        upstream_id: str | None = None,
        unit: str | None = None,
        quantity_micros: int | None = None,
    ) -> LedgerRow:
        """This in-flight row made terminal now (a direct constructor call: the hot path)."""
        return LedgerRow(
            self.request_id,
            self.tenant,
            self.key_id,
            self.model,
            self.endpoint,
            self.mode,
            self.feature,
            self.environment,
            self.stream,
            self.started_us,
            self.period,
            status,
            now_us(),
            upstream_status,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            reasoning_tokens,
            usage_source,
            cost_pusd,
            self.reserved_pusd,
            stream_complete,
            error_code,
            upstream_id,
            self.unit if unit is None else unit,
            quantity_micros,
        )

    @classmethod
    def from_mapping(cls, data: Any) -> LedgerRow:
        values = {c: data[c] for c in COLUMNS}
        values["stream"] = bool(values["stream"])
        values["stream_complete"] = bool(values["stream_complete"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A together.ai Batch job created through the proxy: who pays for it, how far it got."""

    batch_id: str
    tenant: str
    key_id: str
    feature: str | None
    environment: str | None
    created_us: int
    status: str  # the upstream's last known status (VALIDATING, IN_PROGRESS, COMPLETED, ...)
    output_file_id: str | None = None
    recorded_us: int | None = None  # when its rows went into the ledger; None: still followed


@dataclass(frozen=True, slots=True)
class VideoJob:
    """A together.ai video job created through the proxy: who pays for it and whether its row is
    in the ledger. together bills a job when it completes (never a failed one), so its row is
    recorded then (proxy/server/videos.py); until then `reserved_pusd` counts against the
    tenant's budget (a hold, budgets.py)."""

    video_id: str
    tenant: str
    key_id: str
    model: str
    feature: str | None
    environment: str | None
    created_us: int
    request_id: str  # the create call's row (x-request-id of the create answer)
    reserved_pusd: int | None  # the job's upper bound; None: an unpriced model
    seconds_micros: int | None  # the seconds the request asked for (millionths)
    status: str  # the upstream's last known status (in_progress, completed, failed)
    recorded_us: int | None = None  # when its row went into the ledger; None: still followed


# the video_jobs table's columns, in VideoJob's order (both backends)
VIDEO_COLUMNS = ", ".join(f.name for f in fields(VideoJob))


def video_values(job: VideoJob) -> tuple[Any, ...]:
    """The job's column values in VIDEO_COLUMNS order."""
    return tuple(getattr(job, f.name) for f in fields(VideoJob))


@dataclass(frozen=True, slots=True)
class OwnedFile:
    """A together.ai file a tenant owns through the proxy.

    Uploaded by it, or the output/error file of its batch.
    """

    file_id: str
    tenant: str
    key_id: str
    created_us: int
    source: str  # "upload" | "batch_output" | "batch_error"
    batch_id: str | None = None


def now_us() -> int:
    return time.time_ns() // 1000


def period_of(ts_us: int) -> str:
    """Calendar month (UTC) a request belongs to: the one in which it started."""
    return _period_of_second(ts_us // 1_000_000)


@functools.lru_cache(maxsize=4)
def _period_of_second(second: int) -> str:
    t = time.gmtime(second)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


__all__ = [
    "COLUMNS",
    "FINISH_COLUMNS",
    "IN_FLIGHT",
    "LEDGER_COLUMNS",
    "TERMINAL_STATUSES",
    "TOKEN",
    "VIDEO_COLUMNS",
    "BatchJob",
    "Column",
    "LedgerRow",
    "OwnedFile",
    "VideoJob",
    "now_us",
    "period_of",
    "video_values",
]
