"""The ledger: one row per inbound request, keyed by the proxy's request id.

A row is written twice: `begin` commits it as `in_flight` before anything is forwarded (so a
crash can never lose a request the upstream may bill: the reaper turns leftovers into
`orphaned` rows at their reserved cost), and `finish` makes it terminal exactly once.
Backends: `sqlite.py` (one process, the default) and `postgres.py` (replicas sharing a database,
budgets enforced in it); `factory.open_ledger` builds the configured one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from proxy.core.dedicated import EndpointMinute, MinutesLine
    from proxy.core.retention import ImportResult, PruneResult
    from proxy.core.rollups import Rollup, RollupFilter
    from proxy.ledger.endpoint_minutes import MinuteWrite

from proxy.core.records import (
    COLUMNS,
    FINISH_COLUMNS,
    IN_FLIGHT,
    TERMINAL_STATUSES,
    VIDEO_COLUMNS,
    BatchJob,
    LedgerRow,
    OwnedFile,
    VideoJob,
    now_us,
    period_of,
    video_values,
)
from proxy.core.retention import ImportConflict


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

    async def rollups(self, keep: Sequence[str], where: RollupFilter) -> list[Rollup]:
        """The rollups (rollups.py) `where` selects, summed over the dimensions not in `keep`."""

    async def prune(self, before: str) -> PruneResult:
        """Delete the terminal rows of periods before `before`; their rollups stay."""

    async def import_rows(self, records: Iterable[tuple[int, LedgerRow]]) -> ImportResult:
        """Add (line number, row) pairs not in the ledger yet, in one transaction, rollups and
        budget accounts with them; ImportConflict (nothing added) on a different row."""

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

    async def add_video(self, job: VideoJob) -> bool:
        """Remember a video job a tenant created; False if it was already known."""

    async def update_video(self, video_id: str, status: str, recorded_us: int | None) -> bool: ...

    async def videos(self, *, unrecorded: bool = False) -> list[VideoJob]:
        """Known video jobs (oldest first); only those whose row is not recorded yet if `unrecorded`."""

    async def add_file(self, f: OwnedFile) -> bool:
        """Remember which tenant owns a file; False if it was already known (the first owner stays)."""

    async def file_owner(self, file_id: str) -> str | None:
        """The tenant that owns the file, or None if the proxy never saw it made."""

    async def files_of(self, tenant: str) -> set[str]:
        """Ids of the files the tenant owns."""

    async def record_endpoint_minute(self, m: EndpointMinute) -> MinuteWrite:
        """Record one observed dedicated endpoint-minute; a minute is kept once (the larger)."""

    async def endpoint_minutes(self, period: str) -> list[MinutesLine]:
        """The period's endpoint-minutes summed per endpoint (and name, model, hardware, price)."""


__all__ = [
    "COLUMNS",
    "FINISH_COLUMNS",
    "IN_FLIGHT",
    "TERMINAL_STATUSES",
    "VIDEO_COLUMNS",
    "BatchJob",
    "ImportConflict",
    "Ledger",
    "LedgerRow",
    "LedgerUnavailable",
    "OwnedFile",
    "VideoJob",
    "now_us",
    "period_of",
    "video_values",
]
