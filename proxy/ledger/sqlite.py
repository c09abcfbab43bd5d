"""SQLite ledger (WAL): one writer task owns the write connection and group-commits.

Handlers hand rows to the writer and await the commit; every row handed over while the writer
waits for its turn on the event loop goes into the same transaction, so one commit serves many
requests. With `synchronous: normal` a WAL commit is an append to the log file (no fsync) and
runs inline on the loop, which is cheaper than any thread hand-off; with `synchronous: full`
each commit fsyncs, so it runs in a worker thread and the loop keeps serving meanwhile.

A quiet proxy skips the hand-off: when no other request is in flight (no other row begun and not
yet finished: nobody could join a batch), nothing is queued, the writer is not using the
connection and the last commit was a lone row, `begin`/`finish`/`record` commit their row at
once in the caller (`_write_row`: the same statement, its own transaction), on the loop's thread,
with no await between that check and the commit (so the writer cannot interleave), saving the
caller two turns of the loop.
A second write in the same turn of the loop is queued, and that turns the inline path off until
the writer commits a lone row again. Under load (other requests in flight) rows group-commit as
before. Never with `synchronous: full`.
Readers use their own short-lived connections (WAL lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.dedicated import EndpointMinute, MinutesLine
from proxy.core.report import USAGE_KEEP, usage_lines
from proxy.core.retention import ImportResult, PruneResult
from proxy.core.rollups import Rollup, RollupFilter
from proxy.ledger import (
    COLUMNS,
    FINISH_COLUMNS,
    IN_FLIGHT,
    VIDEO_COLUMNS,
    BatchJob,
    LedgerRow,
    LedgerUnavailable,
    OwnedFile,
    VideoJob,
    endpoint_minutes,
    now_us,
    sqlite_bulk,
    video_values,
)
from proxy.ledger.rollup_sql import select_rollups, to_rollup
from proxy.ledger.sqlite_schema import connect_writer, prepare

log = logging.getLogger(__name__)
CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints (the WAL stays small)
# A RESTART checkpoint waits for readers of older snapshots (a report's read): the writer gives up
# after this and tries again a second later, instead of holding every request's commit meanwhile
RESTART_WAIT_MS = 10

_PLACEHOLDERS = ", ".join("?" for _ in COLUMNS)
_INSERT_BEGIN = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS})"
_INSERT_TERMINAL = f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS})"
# What `finish` sets (records.FINISH_COLUMNS). A terminal row is never changed again: that makes
# `finish` idempotent.
_UPDATE_FINISH = (
    "UPDATE requests SET "
    + ", ".join(f"{c} = ?" for c in FINISH_COLUMNS)
    + f" WHERE request_id = ? AND status = '{IN_FLIGHT}'"
)
_FINISH_IDX = tuple(COLUMNS.index(c) for c in FINISH_COLUMNS)


def _finish_values(row: LedgerRow) -> tuple[Any, ...]:
    values = row.values()
    return (*(values[i] for i in _FINISH_IDX), row.request_id)


_Op = tuple[str, LedgerRow, asyncio.Future[bool] | None]  # None: written inline, nobody waits


class SQLiteLedger:
    """The default, embedded ledger: a WAL-mode SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        on_commit: Callable[[int, float, bool], None] | None = None,
        on_terminal: Callable[[LedgerRow], None] | None = None,
        timezone: str = "UTC",
    ) -> None:
        self.path = str(path)
        self.synchronous = synchronous.upper()
        self.periods = Periods(timezone)  # rollup days are cut in budgets.timezone
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the writer's (get_running_loop: a syscall)
        self._closing = False
        self._healthy = True
        self._on_commit = on_commit
        self._on_terminal = on_terminal  # counts a row once, when it became terminal
        # the inline path (module docstring): never when commits fsync in a thread
        self._inline = self.synchronous != "FULL"
        self._busy = False  # the writer uses the connection off the loop (the RESTART checkpoint)
        self._last_batch = 1  # rows of the last commit; > 1: under load, queue and group-commit
        self._turn_open = True  # no inline commit yet in this turn of the loop
        self._open = 0  # rows begun and not yet finished (requests in flight): 0 = nobody could join
        self._next_checkpoint = 0.0  # loop time; inf while a checkpoint runs
        self.orphans_reaped = 0
        self.migrations_applied: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file and schema, reap rows a crash left in flight, start the writer."""
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = connect_writer(self.path, self.periods, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # checkpoints copy the log into the database file and fsync it: that must not
            # happen on the event loop, so the writer runs them in a thread (_write_loop)
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self.migrations_applied = prepare(conn, self.periods)
            self.orphans_reaped = _reap_orphans(conn)  # its rows join their rollups (a trigger)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"cannot open ledger {self.path}: {exc}") from exc
        self._conn = conn
        self._closing = False
        loop = self._loop = asyncio.get_running_loop()
        self._busy, self._last_batch, self._turn_open, self._open = False, 1, True, 0
        self._next_checkpoint = loop.time() + CHECKPOINT_INTERVAL
        self._task = loop.create_task(self._writer(), name="ledger-writer")

    async def close(self) -> None:
        """Commit what is pending, then close the connection."""
        if self._task is None:
            return
        self._closing = True
        self._poke()
        await self._task
        self._task = None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    # -- writes ----------------------------------------------------------------------------

    async def begin(self, row: LedgerRow) -> None:
        if self._idle():
            self._write_inline("begin", row)
        else:
            await self._submit("begin", row)
        self._open += 1

    async def finish(self, row: LedgerRow) -> bool:
        if self._open:  # whatever comes of it: this request is no longer in flight
            self._open -= 1
        if self._idle():
            return self._write_inline("finish", row)
        return await self._submit("finish", row)

    async def record(self, row: LedgerRow) -> bool:
        if self._idle():
            return self._write_inline("record", row)
        return await self._submit("record", row)

    def _idle(self) -> bool:
        """May this write commit at once, in the caller? (the module docstring)"""
        task = self._task
        return (
            self._open == 0
            and self._turn_open
            and self._last_batch == 1
            and not self._pending
            and not self._busy
            and self._inline
            and not self._closing
            and task is not None
            and not task.done()
        )

    def _write_inline(self, kind: str, row: LedgerRow) -> bool:
        """The queued write's transaction and outcomes, run now (no await: nothing interleaves)."""
        loop = self._loop
        assert loop is not None  # set with the task
        self._turn_open = False  # a second write in this turn of the loop is queued (load)
        loop.call_soon(self._reopen_turn)
        made = self._write_row(kind, row)
        if loop.time() >= self._next_checkpoint:
            self._poke()  # the writer runs the checkpoint (it would have on a queued write)
        if made is None:
            raise LedgerUnavailable("the ledger could not commit")
        if isinstance(made, Exception):
            raise made
        if made is True and kind != "begin" and self._on_terminal is not None:
            self._on_terminal(row)
        return made

    def _write_row(self, kind: str, row: LedgerRow) -> bool | Exception | None:
        """`_write` of a batch of one row: the same statement, alone its own transaction (SQLite
        makes a statement outside BEGIN ... COMMIT one transaction, its trigger's rollup
        included; the write lock taken at its start, as BEGIN IMMEDIATE does), without the two
        extra statements. The row's result, or None if the commit failed."""
        assert self._conn is not None
        conn = self._conn
        t0 = time.perf_counter()
        try:
            if kind == "begin":
                try:
                    conn.execute(_INSERT_BEGIN, row.values())
                    made: bool | Exception = True
                except sqlite3.IntegrityError:  # a duplicate id: refuse this row only
                    made = LedgerUnavailable(f"duplicate request id {row.request_id}")
            elif kind == "finish":
                made = conn.execute(_UPDATE_FINISH, _finish_values(row)).rowcount == 1
            else:
                made = conn.execute(_INSERT_TERMINAL, row.values()).rowcount == 1
        except sqlite3.Error as exc:  # the statement's transaction is rolled back
            self._healthy = False
            log.error("ledger write of %d rows failed: %s", 1, exc)
            if self._on_commit is not None:
                self._on_commit(1, time.perf_counter() - t0, False)
            return None
        self._healthy = True
        if self._on_commit is not None:
            self._on_commit(1, time.perf_counter() - t0, True)
        return made

    def _reopen_turn(self) -> None:
        self._turn_open = True

    def _submit(self, kind: str, row: LedgerRow) -> asyncio.Future[bool]:
        if self._task is None or (self._closing and self._task.done()):
            raise LedgerUnavailable("ledger is not open")
        assert self._loop is not None  # set with the task
        if not self._turn_open:  # a row was committed inline in this turn: load, group-commit
            self._last_batch = 2
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._pending.append((kind, row, fut))
        self._poke()
        return fut

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def writable(self) -> bool:
        """True when a write would commit; after a failure, a probe write tells (so readiness
        recovers without waiting for traffic that a load balancer would not send)."""
        if self._task is None or self._task.done() or self._conn is None:
            return False
        if not self._healthy:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
                self._conn.execute("COMMIT")
                self._healthy = True
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
        return self._healthy

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        finally:  # cancelled or crashed: nobody may wait forever for a commit
            batch, self._pending = self._pending, []
            _resolve(batch, None, LedgerUnavailable("the ledger writer stopped"))

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        passive: asyncio.Future[None] | None = None
        while True:
            if passive is None and loop.time() >= self._next_checkpoint:
                # phase 1: copy the WAL into the database beside the writer (nobody waits)
                self._next_checkpoint = float("inf")  # inline writes: no need to poke meanwhile
                passive = asyncio.ensure_future(asyncio.to_thread(self._checkpoint, "PASSIVE"))
            elif passive is not None and passive.done():
                # phase 2: the few frames written since, then restart the WAL so it stays
                # small; rows arriving meanwhile wait and go into the next (bigger) batch
                passive = None
                self._busy = True  # the connection is in a thread: nothing commits inline
                try:
                    await asyncio.to_thread(self._checkpoint, "RESTART", self._conn)
                finally:
                    self._busy = False
                self._next_checkpoint = loop.time() + CHECKPOINT_INTERVAL
            if self._pending and not self._closing and (len(self._pending) > 1 or self._last_batch > 1):
                # under load, one more turn of the loop lets the handlers that are about to
                # write join this transaction: fewer, larger commits. A lone row after a lone
                # row (a quiet proxy) commits at once: that turn is latency, nobody joins.
                await asyncio.sleep(0)
            if not self._pending:
                if self._closing:
                    if passive is not None:
                        await passive
                    return
                self._wake = loop.create_future()
                if passive is not None:
                    await asyncio.wait((self._wake, passive), return_when=asyncio.FIRST_COMPLETED)
                else:
                    await self._wake
                continue
            batch, self._pending = self._pending, []
            self._last_batch = len(batch)
            if self.synchronous == "FULL":
                ok, results = await asyncio.to_thread(self._write, batch)
            else:
                ok, results = self._write(batch)
            if ok and self._on_terminal is not None:  # on the loop thread, whatever the mode
                for (kind, row, _), made in zip(batch, results, strict=True):
                    if made is True and kind != "begin":
                        self._on_terminal(row)
            _resolve(
                batch,
                results if ok else None,
                None if ok else LedgerUnavailable("the ledger could not commit"),
            )

    def _checkpoint(self, mode: str, conn: sqlite3.Connection | None = None) -> None:
        own = conn is None
        try:
            if conn is None:
                conn = sqlite3.connect(self.path, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=1000")
                conn.execute(f"PRAGMA wal_checkpoint({mode})")
            else:  # the writer's own RESTART: never wait for readers (writes queue meanwhile)
                conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
                try:
                    conn.execute(f"PRAGMA wal_checkpoint({mode})")
                finally:
                    conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:  # readers in the way: the next one will do
            log.warning("ledger checkpoint (%s) failed: %s", mode, exc)
        finally:
            if own and conn is not None:
                conn.close()

    def _write(self, batch: list[_Op]) -> tuple[bool, list[bool | Exception]]:
        """One transaction for the whole batch; True and per-row results, or False."""
        assert self._conn is not None
        conn = self._conn
        t0 = time.perf_counter()
        results: list[bool | Exception] = []
        cur = conn.cursor()  # one cursor for the batch, not one per statement
        try:
            cur.execute("BEGIN IMMEDIATE")
            for kind, row, _ in batch:
                if kind == "begin":
                    try:
                        cur.execute(_INSERT_BEGIN, row.values())
                        results.append(True)
                    except sqlite3.IntegrityError:  # a duplicate id: refuse this row only
                        results.append(LedgerUnavailable(f"duplicate request id {row.request_id}"))
                elif kind == "finish":
                    results.append(cur.execute(_UPDATE_FINISH, _finish_values(row)).rowcount == 1)
                else:
                    results.append(cur.execute(_INSERT_TERMINAL, row.values()).rowcount == 1)
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._healthy = False
            log.error("ledger write of %d rows failed: %s", len(batch), exc)
            if self._on_commit is not None:
                self._on_commit(len(batch), time.perf_counter() - t0, False)
            return False, []
        except BaseException:  # not the database's (a value it cannot bind): undo, then raise
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._healthy = True
        if self._on_commit is not None:
            self._on_commit(len(batch), time.perf_counter() - t0, True)
        return True, results

    # -- reads -----------------------------------------------------------------------------

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=5000")
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table: rollups" not in str(exc):
                raise
            raise LedgerUnavailable(
                f"ledger {self.path} has no rollups yet: start the proxy on it once with this version, "
                "or run `together-meter db migrate --config FILE` while no proxy writes to it"
            ) from None
        finally:
            conn.close()

    async def rollups(self, keep: Sequence[str], where: RollupFilter) -> list[Rollup]:
        """Rollup lines summed over the dimensions not in `keep`, in the database (a worker thread)."""
        sql, params = select_rollups(keep, where, "sqlite")

        def read() -> list[Rollup]:
            return [to_rollup(r) for r in self._read(sql, tuple(params))]

        return await asyncio.to_thread(read)

    async def migrate(self) -> tuple[list[str], int]:
        """Create the schema, and the rollups from the rows if the file has none (`db migrate`)."""

        def run() -> list[str]:
            conn = connect_writer(self.path, self.periods)
            try:
                return prepare(conn, self.periods)
            finally:
                conn.close()

        return await asyncio.to_thread(run), 1

    async def rows(self, *, period: str | None = None, since_us: int | None = None) -> list[LedgerRow]:
        clauses: list[str] = []
        params: list[Any] = []
        if period is not None:
            clauses.append("period = ?")
            params.append(period)
        if since_us is not None:
            clauses.append("started_us >= ?")
            params.append(since_us)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        sql = f"SELECT {', '.join(COLUMNS)} FROM requests {where}ORDER BY started_us, request_id"
        found = await asyncio.to_thread(self._read, sql, tuple(params))
        return [LedgerRow.from_mapping(r) for r in found]

    async def period_costs(self, period: str) -> list[tuple[str, str | None, int]]:
        """(tenant, feature, cost) of the period's terminal rows, summed per tenant and feature."""
        found = await self.rollups(("period", "tenant", "feature"), RollupFilter(periods=(period,)))
        return [(r.tenant, r.feature, r.cost_pusd) for r in found if r.priced]

    async def usage(self, period: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """Per tenant, model, feature and environment: requests, tokens, cost, flagged rows."""
        found = await self.rollups(USAGE_KEEP, RollupFilter(periods=(period,), tenant=tenant))
        return usage_lines(found)

    async def notifications(self, period: str) -> list[tuple[str, str | None, str]]:
        """(tenant, feature, threshold) already delivered in `period`."""
        found = await asyncio.to_thread(
            self._read,
            "SELECT tenant, feature, threshold FROM notifications WHERE period = ?",
            (period,),
        )
        return [(r["tenant"], r["feature"] or None, r["threshold"]) for r in found]

    async def claim_notification(self, tenant: str, feature: str | None, period: str, threshold: str) -> bool:
        """One process writes this file (workers > 1 needs PostgreSQL): nobody else can send it."""
        return True

    async def release_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> None:
        return None

    async def record_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> bool:
        """Remember a delivered notification; False if it was already recorded."""

        def write() -> bool:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                cur = conn.execute(
                    "INSERT OR IGNORE INTO notifications VALUES (?, ?, ?, ?, ?)",
                    (tenant, feature or "", period, threshold, now_us()),
                )
                return cur.rowcount == 1
            finally:
                conn.close()

        return await asyncio.to_thread(write)

    # -- batch jobs (proxy/server/batches.py) ------------------------------------------------------

    async def add_batch(self, batch: BatchJob) -> bool:
        """Remember which tenant created a batch; False if it was already known."""
        return await asyncio.to_thread(
            self._write_one,
            "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                batch.batch_id,
                batch.tenant,
                batch.key_id,
                batch.feature,
                batch.environment,
                batch.created_us,
                batch.status,
                batch.output_file_id,
                batch.recorded_us,
            ),
        )

    async def update_batch(
        self, batch_id: str, status: str, output_file_id: str | None, recorded_us: int | None
    ) -> bool:
        return await asyncio.to_thread(
            self._write_one,
            "UPDATE batches SET status = ?, output_file_id = ?, recorded_us = ? WHERE batch_id = ?",
            (status, output_file_id, recorded_us, batch_id),
        )

    async def batches(self, *, unrecorded: bool = False) -> list[BatchJob]:
        """Known batches (oldest first); only those not yet recorded if `unrecorded`."""
        where = "WHERE recorded_us IS NULL " if unrecorded else ""
        found = await asyncio.to_thread(
            self._read, f"SELECT * FROM batches {where}ORDER BY created_us, batch_id"
        )
        return [BatchJob(**dict(r)) for r in found]

    async def batch_owner(self, batch_id: str) -> str | None:
        """The tenant that created the batch, or None if the proxy never saw it created."""
        return await self._owner("SELECT tenant FROM batches WHERE batch_id = ?", batch_id)

    async def batches_of(self, tenant: str) -> set[str]:
        """Ids of the batches the tenant created."""
        return await self._ids("SELECT batch_id FROM batches WHERE tenant = ?", tenant)

    # -- video jobs (proxy/server/videos.py) -------------------------------------------------

    async def add_video(self, job: VideoJob) -> bool:
        """Remember a video job a tenant created; False if it was already known."""
        return await asyncio.to_thread(
            self._write_one,
            f"INSERT OR IGNORE INTO video_jobs ({VIDEO_COLUMNS}) VALUES ({', '.join('?' * 12)})",
            video_values(job),
        )

    async def update_video(self, video_id: str, status: str, recorded_us: int | None) -> bool:
        return await asyncio.to_thread(
            self._write_one,
            "UPDATE video_jobs SET status = ?, recorded_us = ? WHERE video_id = ? AND recorded_us IS NULL",
            (status, recorded_us, video_id),
        )

    async def videos(self, *, unrecorded: bool = False) -> list[VideoJob]:
        """Known video jobs (oldest first); only those not yet recorded if `unrecorded`."""
        where = "WHERE recorded_us IS NULL " if unrecorded else ""
        found = await asyncio.to_thread(
            self._read, f"SELECT {VIDEO_COLUMNS} FROM video_jobs {where}ORDER BY created_us, video_id"
        )
        return [VideoJob(**dict(r)) for r in found]

    # -- file ownership (tenant isolation) ----------------------------------------------------

    async def add_file(self, f: OwnedFile) -> bool:
        """Remember which tenant owns a file; False if it was already known (the first owner stays)."""
        return await asyncio.to_thread(
            self._write_one,
            "INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?, ?, ?)",
            (f.file_id, f.tenant, f.key_id, f.created_us, f.source, f.batch_id),
        )

    async def file_owner(self, file_id: str) -> str | None:
        """The tenant that owns the file, or None if the proxy never saw it made."""
        return await self._owner("SELECT tenant FROM files WHERE file_id = ?", file_id)

    async def files_of(self, tenant: str) -> set[str]:
        """Ids of the files the tenant owns."""
        return await self._ids("SELECT file_id FROM files WHERE tenant = ?", tenant)

    async def _owner(self, sql: str, key: str) -> str | None:
        found = await asyncio.to_thread(self._read, sql, (key,))
        return str(found[0][0]) if found else None

    async def _ids(self, sql: str, tenant: str) -> set[str]:
        return {str(r[0]) for r in await asyncio.to_thread(self._read, sql, (tenant,))}

    # -- dedicated endpoints by the minute (proxy/server/dedicated.py) -------------------------------

    async def record_endpoint_minute(self, m: EndpointMinute) -> endpoint_minutes.MinuteWrite:
        """Record one observed endpoint-minute (once per minute; the larger observation stays)."""

        def write() -> endpoint_minutes.MinuteWrite:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                return endpoint_minutes.sqlite_record(conn, m)
            finally:
                conn.close()

        try:
            return await asyncio.to_thread(write)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"ledger {self.path}: {exc}") from None

    async def endpoint_minutes(self, period: str) -> list[MinutesLine]:
        """The period's endpoint-minutes summed per endpoint, name, model, hardware and price."""

        def read() -> list[MinutesLine]:
            try:
                return [
                    endpoint_minutes.to_line(r) for r in self._read(endpoint_minutes.SQLITE_LINES, (period,))
                ]
            except sqlite3.OperationalError as exc:
                if "no such table: endpoint_minutes" in str(exc):
                    return []  # a ledger no proxy of this version has opened yet: nothing measured
                raise

        return await asyncio.to_thread(read)

    def _write_one(self, sql: str, params: tuple[Any, ...]) -> bool:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            return conn.execute(sql, params).rowcount == 1
        finally:
            conn.close()

    async def iter_rows(
        self, *, period: str | None = None, since_us: int | None = None, page: int = 5000
    ) -> AsyncIterator[LedgerRow]:
        """Rows oldest first, read a page at a time (keyset pagination: memory stays flat)."""
        after: tuple[int, str] = (-1, "")
        while True:
            clauses, params = ["(started_us, request_id) > (?, ?)"], [*after]
            if period is not None:
                clauses.append("period = ?")
                params.append(period)
            if since_us is not None:
                clauses.append("started_us >= ?")
                params.append(since_us)
            sql = (
                f"SELECT {', '.join(COLUMNS)} FROM requests WHERE {' AND '.join(clauses)} "
                "ORDER BY started_us, request_id LIMIT ?"
            )
            found = await asyncio.to_thread(self._read, sql, (*params, page))
            for r in found:
                yield LedgerRow.from_mapping(r)
            if len(found) < page:
                return
            after = (found[-1]["started_us"], found[-1]["request_id"])

    async def prune(self, before: str, *, chunk: int = 20_000) -> PruneResult:
        """Delete the terminal rows of every period before `before`; their rollups stay.

        Chunk by chunk, each chunk one transaction, so a running proxy's writer waits at most
        one chunk for the lock.
        """

        def run() -> PruneResult:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                self._require_rollups(conn)
                return sqlite_bulk.prune(conn, before, chunk)
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    async def import_rows(self, records: Iterable[tuple[int, LedgerRow]]) -> ImportResult:
        """Rows not in the ledger yet, added in one transaction (a worker thread); the file's
        schema and rollups are made first if it is new."""

        def run() -> ImportResult:
            conn = connect_writer(self.path, self.periods)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                prepare(conn, self.periods)
                return sqlite_bulk.import_rows(conn, records)
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    def _require_rollups(self, conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM meta WHERE key = 'rollups'").fetchone() is None:
            self._read("SELECT 1 FROM rollups")  # raises the LedgerUnavailable that says what to do

    async def integrity_ok(self) -> bool:
        found = await asyncio.to_thread(self._read, "PRAGMA integrity_check")
        return bool(found) and found[0][0] == "ok"


def _resolve(batch: list[_Op], results: list[bool | Exception] | None, error: BaseException | None) -> None:
    for i, (_, _, fut) in enumerate(batch):
        if fut is None or fut.done():
            continue
        result = error if results is None else results[i]
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(bool(result))


def _reap_orphans(conn: sqlite3.Connection) -> int:
    """Rows left in flight by a crash become `orphaned`, charged at their reserved cost.

    The upstream may have billed them and nothing can tell us how much: the reservation is
    the upper bound we priced before forwarding, so the ledger errs on the side of the bill.
    """
    cur = conn.execute(
        "UPDATE requests SET status = 'orphaned', finished_us = ?, cost_pusd = reserved_pusd, "
        "usage_source = 'estimated', error_code = 'process_died' WHERE status = ?",
        (now_us(), IN_FLIGHT),
    )
    n = cur.rowcount
    if n:
        log.warning("start-up reaper: %d request(s) left in flight by a previous run -> orphaned", n)
    return n
