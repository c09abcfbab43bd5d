"""The ledger: one row per inbound request, keyed by the proxy's request id.

A row is written twice: `begin` commits it as `in_flight` before anything is forwarded (so a
crash can never lose a request the upstream may bill: the reaper turns leftovers into
`orphaned` rows at their reserved cost), and `finish` makes it terminal exactly once.
Backends: `sqlite.py` (one process, the default) and `postgres.py` (replicas sharing a database,
budgets enforced in it); `factory.open_ledger` builds the configured one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..budgets import Periods
    from ..retention import Aggregate, PruneResult

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

COLUMNS = (
    "request_id",
    "tenant",
    "key_id",
    "model",
    "endpoint",
    "mode",
    "feature",
    "environment",
    "stream",
    "started_us",
    "finished_us",
    "period",
    "upstream_status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_source",
    "cost_pusd",
    "reserved_pusd",
    "status",
    "stream_complete",
    "error_code",
    "upstream_id",
)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One request as the ledger keeps it. Money in pico-USD; times in µs since the epoch."""

    request_id: str
    tenant: str
    key_id: str
    model: str
    endpoint: str
    mode: str
    feature: str | None
    environment: str | None
    stream: bool
    started_us: int
    period: str
    status: str = IN_FLIGHT
    finished_us: int | None = None
    upstream_status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    usage_source: str = "none"
    cost_pusd: int | None = None
    reserved_pusd: int | None = 0  # None: an unpriced model, so no bound is known
    stream_complete: bool = False
    error_code: str | None = None
    upstream_id: str | None = None

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


class LedgerUnavailable(Exception):
    """The ledger could not commit; the request must not go upstream."""


class Ledger(Protocol):
    """What the relay needs from a ledger backend."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def begin(self, row: LedgerRow) -> None:
        """Commit `row` as in_flight; raises LedgerUnavailable if it cannot."""

    async def finish(self, row: LedgerRow) -> bool:
        """Commit the terminal `row` of a begun request; True if this call made it terminal.

        Idempotent: a row already terminal is never changed again.
        """

    async def record(self, row: LedgerRow) -> bool:
        """Commit a terminal `row` that was never begun (a rejected request)."""

    async def writable(self) -> bool: ...

    def iter_rows(
        self, *, period: str | None = None, since_us: int | None = None, page: int = 5000
    ) -> AsyncIterator[LedgerRow]:
        """Rows oldest first, a page at a time (exports of months with millions of rows)."""

    async def aggregates(self, period: str) -> list[Aggregate]:
        """What `db prune` kept of a period's rows (retention.py)."""

    async def prune(self, before: str, periods: Periods) -> PruneResult:
        """Fold terminal rows of periods before `before` into aggregates and delete them."""

    async def rows(self, *, period: str | None = None, since_us: int | None = None) -> list[LedgerRow]:
        """Rows oldest first: all, or those of one period, or those started at or after `since_us`."""

    async def period_costs(self, period: str) -> list[tuple[str, str | None, int]]: ...

    async def usage(self, period: str, tenant: str | None = None) -> list[dict[str, Any]]: ...

    async def notifications(self, period: str) -> list[tuple[str, str | None, str]]: ...

    async def claim_notification(self, tenant: str, feature: str | None, period: str, threshold: str) -> bool:
        """The right to send this budget message (False: sent, or another replica sends it)."""

    async def release_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> None: ...

    async def record_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> bool: ...

    async def add_batch(self, batch: BatchJob) -> bool:
        """Remember a batch job a tenant created; False if it was already known."""

    async def update_batch(
        self, batch_id: str, status: str, output_file_id: str | None, recorded_us: int | None
    ) -> bool: ...

    async def batches(self, *, unrecorded: bool = False) -> list[BatchJob]: ...

    async def batch_owner(self, batch_id: str) -> str | None:
        """The tenant that created the batch, or None if the proxy never saw it created."""

    async def batches_of(self, tenant: str) -> set[str]:
        """Ids of the batches the tenant created."""

    async def add_file(self, f: OwnedFile) -> bool:
        """Remember which tenant owns a file; False if it was already known (the first owner stays)."""

    async def file_owner(self, file_id: str) -> str | None:
        """The tenant that owns the file, or None if the proxy never saw it made."""

    async def files_of(self, tenant: str) -> set[str]:
        """Ids of the files the tenant owns."""


__all__ = [
    "COLUMNS",
    "IN_FLIGHT",
    "TERMINAL_STATUSES",
    "BatchJob",
    "Ledger",
    "LedgerRow",
    "LedgerUnavailable",
    "OwnedFile",
    "now_us",
    "period_of",
]
