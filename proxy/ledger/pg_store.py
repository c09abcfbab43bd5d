"""PostgreSQL ledger store: the connection pool, schema migrations and every read.

`PostgresStore` is what the commands that only read or prune (`report`, `estimate`, `db ...`)
need; `postgres.PostgresLedger` adds the writer, the budgets and the reaper on top of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from proxy.core.budgets import Periods
from proxy.core.dedicated import EndpointMinute, MinutesLine
from proxy.core.report import USAGE_KEEP, usage_lines
from proxy.core.retention import ImportResult, PruneResult
from proxy.core.rollups import Rollup, RollupFilter
from proxy.ledger import (
    COLUMNS,
    VIDEO_COLUMNS,
    BatchJob,
    LedgerRow,
    LedgerUnavailable,
    OwnedFile,
    VideoJob,
    endpoint_minutes,
    now_us,
    pg_bulk,
    pg_partitions,
    video_values,
)
from proxy.ledger.migrate import current_version, migrate
from proxy.ledger.rollup_sql import select_rollups, to_rollup

log = logging.getLogger(__name__)
MIGRATION_TIMEOUT = 6 * 3600.0  # seconds: 0006 copies `requests` (about 6 s per million rows here)
_PASSWORD_IN_URL = re.compile(r"(://[^/@:]*:)[^@/]*@")
_PASSWORD_IN_QUERY = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by `***` (for logs and errors)."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", dsn))


def _password(dsn: str) -> str | None:
    m = re.search(r"://[^/@:]*:([^@/]*)@", dsn) or re.search(r"password=([^&\s]+)", dsn, re.IGNORECASE)
    return m.group(1) if m and m.group(1) else None


class PostgresStore:
    """One PostgreSQL database holding the ledger: reads, notifications, batch jobs, file owners, pruning."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        lease_seconds: float = 30.0,
        commit_timeout: float = 5.0,
        timezone: str = "UTC",
    ) -> None:
        self._dsn = dsn
        self.periods = Periods(timezone)  # rollup days are cut in budgets.timezone
        self.where = mask_dsn(dsn)  # what logs and errors may show
        self._secret = _password(dsn)
        self.pool_size = pool_size
        self.lease_seconds = lease_seconds
        self.commit_timeout = commit_timeout
        self.instance_id = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._pool: asyncpg.Pool | None = None
        self.ahead: tuple[str, str] | None = None  # the months whose partitions were last made sure of
        self.partitions_made: list[str] = []  # by the last migrate()

    async def migrate(self) -> tuple[list[str], int]:
        """Apply the pending schema migrations (`db migrate` runs this), then make sure the current
        and next month's partitions exist; (applied, version now)."""
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                done = await migrate(conn, timezone=self.periods.timezone, command_timeout=MIGRATION_TIMEOUT)
                applied = [m.label for m in done]
                self.partitions_made = await self.make_ahead(conn)
                return applied, await current_version(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(f"cannot migrate ledger {self.where}: {self._scrub(exc)}") from None

    async def make_ahead(self, conn: asyncpg.Connection) -> list[str]:
        """Make sure the partitions of this month and the next exist (the months made). Not fatal:
        on failure it logs, and the next call (the heartbeat's) or a write that needs one makes it."""
        ahead = pg_partitions.ahead(self.periods, now_us())
        try:
            made = await pg_partitions.ensure(conn, ahead)
        except asyncpg.PostgresError as exc:
            log.warning("ledger: could not make the partitions of %s (next try in a while): %s",
                        " and ".join(ahead), self._scrub(exc))  # fmt: skip
            return []
        self.ahead = ahead
        return made

    async def close(self) -> None:
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self.commit_timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,  # no floor to keep up while the database is away (it would log)
                max_size=self.pool_size,
                timeout=self.commit_timeout,
                command_timeout=max(self.commit_timeout, 30.0),
                server_settings={"application_name": "together-meter"},
            )
        return self._pool

    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if self._secret:
            text = text.replace(self._secret, "***")
        return mask_dsn(text)

    # -- reads -----------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except asyncpg.UndefinedTableError:
            raise LedgerUnavailable(
                f"ledger {self.where} has no schema yet: run `together-meter db migrate --config FILE`"
            ) from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(f"ledger {self.where}: {self._scrub(exc)}") from None

    async def _execute(self, sql: str, *args: Any) -> str:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            return str(await conn.execute(sql, *args, timeout=self.commit_timeout))

    async def rows(self, *, period: str | None = None, since_us: int | None = None) -> list[LedgerRow]:
        where, params = _filters(period, since_us)
        found = await self._fetch(
            f"SELECT {', '.join(COLUMNS)} FROM requests {where} ORDER BY started_us, request_id", *params
        )
        return [LedgerRow.from_mapping(r) for r in found]

    async def iter_rows(
        self, *, period: str | None = None, since_us: int | None = None, page: int = 5000
    ) -> AsyncIterator[LedgerRow]:
        """Rows oldest first, a page at a time (keyset pagination: memory stays flat)."""
        after: tuple[int, str] = (-1, "")
        while True:
            where, params = _filters(period, since_us, after)
            found = await self._fetch(
                f"SELECT {', '.join(COLUMNS)} FROM requests {where} "
                f"ORDER BY started_us, request_id LIMIT ${len(params) + 1}",
                *params,
                page,
            )
            for r in found:
                yield LedgerRow.from_mapping(r)
            if len(found) < page:
                return
            after = (found[-1]["started_us"], found[-1]["request_id"])

    async def rollups(self, keep: Sequence[str], where: RollupFilter) -> list[Rollup]:
        """Rollup lines summed over the dimensions not in `keep`, in the database."""
        sql, params = select_rollups(keep, where, "postgres")
        return [to_rollup(r) for r in await self._fetch(sql, *params)]

    async def period_costs(self, period: str) -> list[tuple[str, str | None, int]]:
        """(tenant, feature, cost) of the period's terminal rows, summed per tenant and feature."""
        found = await self.rollups(("period", "tenant", "feature"), RollupFilter(periods=(period,)))
        return [(r.tenant, r.feature, r.cost_pusd) for r in found if r.priced]

    async def account_spend(self, period: str) -> list[tuple[str, str | None, int]]:
        """(tenant, feature or None for the whole tenant, spent) from the accounts, all replicas."""
        found = await self._fetch(
            "SELECT tenant, feature, spent_pusd FROM accounts WHERE period = $1", period
        )
        return [(r[0], r[1] or None, int(r[2])) for r in found]

    async def accounts(self, period: str) -> dict[tuple[str, str | None], tuple[int, int]]:
        """(tenant, feature) -> (spent, reserved) as the database holds them (tests, operators)."""
        found = await self._fetch(
            "SELECT tenant, feature, spent_pusd, reserved_pusd FROM accounts WHERE period = $1", period
        )
        return {(r[0], r[1] or None): (int(r[2]), int(r[3])) for r in found}

    async def usage(self, period: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """Per tenant, model, feature and environment: requests, tokens, cost, flagged rows."""
        return usage_lines(await self.rollups(USAGE_KEEP, RollupFilter(periods=(period,), tenant=tenant)))

    # -- budget notifications (notify.py) ---------------------------------------------------

    async def notifications(self, period: str) -> list[tuple[str, str | None, str]]:
        """(tenant, feature, threshold) delivered in `period`, or being delivered by a live replica."""
        found = await self._fetch(
            "SELECT tenant, feature, threshold FROM notifications WHERE period = $1 AND "
            "(sent_us IS NOT NULL OR claimed_at > now() - make_interval(secs => $2))",
            period,
            float(self.lease_seconds),
        )
        return [(r[0], r[1] or None, r[2]) for r in found]

    async def claim_notification(self, tenant: str, feature: str | None, period: str, threshold: str) -> bool:
        """Take the right to send this message: False if it was sent, or another replica is sending it.

        A claim older than the lease (its replica died before delivering) can be taken over.
        """
        found = await self._fetch(
            "INSERT INTO notifications (tenant, feature, period, threshold, claimed_by, claimed_at) "
            "VALUES ($1, $2, $3, $4, $5, now()) ON CONFLICT (tenant, feature, period, threshold) DO UPDATE "
            "SET claimed_by = excluded.claimed_by, claimed_at = excluded.claimed_at "
            "WHERE notifications.sent_us IS NULL AND (notifications.claimed_by = excluded.claimed_by "
            "OR notifications.claimed_at IS NULL "
            "OR notifications.claimed_at < now() - make_interval(secs => $6)) RETURNING 1",
            tenant,
            feature or "",
            period,
            threshold,
            self.instance_id,
            float(self.lease_seconds),
        )
        return bool(found)

    async def release_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> None:
        """Give a claim back (delivery given up): the next start may send it again."""
        await self._fetch(
            "DELETE FROM notifications WHERE tenant = $1 AND feature = $2 AND period = $3 "
            "AND threshold = $4 AND sent_us IS NULL AND claimed_by = $5 RETURNING 1",
            tenant,
            feature or "",
            period,
            threshold,
            self.instance_id,
        )

    async def record_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> bool:
        """Remember a delivered notification; False if it was already recorded."""
        found = await self._fetch(
            "INSERT INTO notifications (tenant, feature, period, threshold, sent_us) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, feature, period, threshold) DO UPDATE "
            "SET sent_us = excluded.sent_us WHERE notifications.sent_us IS NULL RETURNING 1",
            tenant,
            feature or "",
            period,
            threshold,
            now_us(),
        )
        return bool(found)

    # -- batch jobs (proxy/server/batches.py) ------------------------------------------------------

    async def add_batch(self, batch: BatchJob) -> bool:
        """Remember which tenant created a batch; False if it was already known."""
        found = await self._fetch(
            "INSERT INTO batches VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
            "ON CONFLICT (batch_id) DO NOTHING RETURNING 1",
            batch.batch_id,
            batch.tenant,
            batch.key_id,
            batch.feature,
            batch.environment,
            batch.created_us,
            batch.status,
            batch.output_file_id,
            batch.recorded_us,
        )
        return bool(found)

    async def update_batch(
        self, batch_id: str, status: str, output_file_id: str | None, recorded_us: int | None
    ) -> bool:
        found = await self._fetch(
            "UPDATE batches SET status = $1, output_file_id = $2, recorded_us = $3 WHERE batch_id = $4 "
            "RETURNING 1",
            status,
            output_file_id,
            recorded_us,
            batch_id,
        )
        return bool(found)

    async def batches(self, *, unrecorded: bool = False) -> list[BatchJob]:
        """Known batches (oldest first); only those not yet recorded if `unrecorded`."""
        where = "WHERE recorded_us IS NULL " if unrecorded else ""
        found = await self._fetch(f"SELECT * FROM batches {where}ORDER BY created_us, batch_id")
        return [BatchJob(**dict(r)) for r in found]

    async def batch_owner(self, batch_id: str) -> str | None:
        """The tenant that created the batch, or None if the proxy never saw it created."""
        found = await self._fetch("SELECT tenant FROM batches WHERE batch_id = $1", batch_id)
        return str(found[0][0]) if found else None

    async def batches_of(self, tenant: str) -> set[str]:
        """Ids of the batches the tenant created."""
        found = await self._fetch("SELECT batch_id FROM batches WHERE tenant = $1", tenant)
        return {str(r[0]) for r in found}

    # -- video jobs (proxy/server/videos.py) -------------------------------------------------

    async def add_video(self, job: VideoJob) -> bool:
        """Remember a video job a tenant created; False if it was already known."""
        marks = ", ".join(f"${i}" for i in range(1, 13))
        found = await self._fetch(
            f"INSERT INTO video_jobs ({VIDEO_COLUMNS}) VALUES ({marks}) "
            "ON CONFLICT (video_id) DO NOTHING RETURNING 1",
            *video_values(job),
        )
        return bool(found)

    async def update_video(self, video_id: str, status: str, recorded_us: int | None) -> bool:
        found = await self._fetch(
            "UPDATE video_jobs SET status = $1, recorded_us = $2 WHERE video_id = $3 "
            "AND recorded_us IS NULL RETURNING 1",
            status,
            recorded_us,
            video_id,
        )
        return bool(found)

    async def videos(self, *, unrecorded: bool = False) -> list[VideoJob]:
        """Known video jobs (oldest first); only those not yet recorded if `unrecorded`."""
        where = "WHERE recorded_us IS NULL " if unrecorded else ""
        found = await self._fetch(
            f"SELECT {VIDEO_COLUMNS} FROM video_jobs {where}ORDER BY created_us, video_id"
        )
        return [VideoJob(**dict(r)) for r in found]

    # -- file ownership (tenant isolation) ----------------------------------------------------

    async def add_file(self, f: OwnedFile) -> bool:
        """Remember which tenant owns a file; False if it was already known (the first owner stays)."""
        found = await self._fetch(
            "INSERT INTO files VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (file_id) DO NOTHING RETURNING 1",
            f.file_id,
            f.tenant,
            f.key_id,
            f.created_us,
            f.source,
            f.batch_id,
        )
        return bool(found)

    async def file_owner(self, file_id: str) -> str | None:
        """The tenant that owns the file, or None if the proxy never saw it made."""
        found = await self._fetch("SELECT tenant FROM files WHERE file_id = $1", file_id)
        return str(found[0][0]) if found else None

    async def files_of(self, tenant: str) -> set[str]:
        """Ids of the files the tenant owns."""
        found = await self._fetch("SELECT file_id FROM files WHERE tenant = $1", tenant)
        return {str(r[0]) for r in found}

    # -- dedicated endpoints by the minute (proxy/server/dedicated.py) -------------------------------

    async def record_endpoint_minute(self, m: EndpointMinute) -> endpoint_minutes.MinuteWrite:
        """Record one observed endpoint-minute (once per minute across replicas; the larger stays)."""
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                return await endpoint_minutes.pg_record(conn, m)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(f"ledger {self.where}: {self._scrub(exc)}") from None

    async def endpoint_minutes(self, period: str) -> list[MinutesLine]:
        """The period's endpoint-minutes summed per endpoint, name, model, hardware and price."""
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                found = await conn.fetch(endpoint_minutes.PG_LINES, period)
        except asyncpg.UndefinedTableError:
            return []  # a database not migrated to 0005 yet: nothing measured
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(f"ledger {self.where}: {self._scrub(exc)}") from None
        return [endpoint_minutes.to_line(r) for r in found]

    # -- retention and imports (pg_bulk.py) ----------------------------------------------------

    async def prune(self, before: str, *, chunk: int = 20_000) -> PruneResult:
        """The terminal rows of every period before `before` out of the ledger, whole monthly
        partitions dropped (pg_partitions.py); their rollups stay (and the accounts of those
        periods keep their spend)."""
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                return await pg_partitions.prune(conn, before, chunk)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(f"ledger {self.where}: {self._scrub(exc)}") from None

    async def import_rows(self, records: Iterable[tuple[int, LedgerRow]]) -> ImportResult:
        """Rows not in the ledger yet, in one transaction, with their rollups and account moves."""
        await self.migrate()
        side: list[asyncpg.Connection] = []  # makes the partitions of months the file brings

        async def partitions(periods: set[str]) -> None:
            if not side:
                side.append(await asyncpg.connect(self._dsn, timeout=self.commit_timeout))
            await pg_partitions.ensure(side[0], periods)

        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                return await pg_bulk.import_rows(conn, records, self.periods.timezone, partitions)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(f"ledger {self.where}: {self._scrub(exc)}") from None
        finally:
            for c in side:
                await c.close()


def _filters(
    period: str | None, since_us: int | None, after: tuple[int, str] | None = None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if after is not None:
        params.extend(after)
        clauses.append("(started_us, request_id) > ($1, $2)")
    if period is not None:
        params.append(period)
        clauses.append(f"period = ${len(params)}")
    if since_us is not None:
        params.append(since_us)
        clauses.append(f"started_us >= ${len(params)}")
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params
