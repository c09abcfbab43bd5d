"""SQLite ledger (WAL): one writer task owns the write connection and group-commits.

Handlers hand rows to the writer and await the commit; every row handed over while the writer
waits for its turn on the event loop goes into the same transaction, so one commit serves many
requests. With `synchronous: normal` a WAL commit is an append to the log file (no fsync) and
runs inline on the loop, which is cheaper than any thread hand-off; with `synchronous: full`
each commit fsyncs, so it runs in a worker thread and the loop keeps serving meanwhile.
Readers use their own short-lived connections (WAL lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from proxy.core.budgets import Periods
from proxy.core.retention import Aggregate, PruneResult, aggregate_rows
from proxy.ledger import COLUMNS, IN_FLIGHT, BatchJob, LedgerRow, LedgerUnavailable, OwnedFile, now_us

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints (the WAL stays small)

# what `db prune` folds old rows into (retention.py); '' stands for no feature / environment
AGGREGATES_SCHEMA = """
CREATE TABLE IF NOT EXISTS aggregates (
    period TEXT NOT NULL,
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    mode TEXT NOT NULL,
    feature TEXT NOT NULL,
    environment TEXT NOT NULL,
    status TEXT NOT NULL,
    usage_source TEXT NOT NULL,
    requests INTEGER NOT NULL,
    with_usage INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    priced INTEGER NOT NULL,
    cost_pusd INTEGER NOT NULL,
    PRIMARY KEY (period, day, tenant, model, endpoint, mode, feature, environment, status, usage_source)
) WITHOUT ROWID;
"""
_UPSERT_AGGREGATE = (
    "INSERT INTO aggregates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (period, day, tenant, model, endpoint, mode, feature, environment, status, usage_source) "
    "DO UPDATE SET requests = requests + excluded.requests, with_usage = with_usage + excluded.with_usage, "
    "input_tokens = input_tokens + excluded.input_tokens, "
    "output_tokens = output_tokens + excluded.output_tokens, priced = priced + excluded.priced, "
    "cost_pusd = cost_pusd + excluded.cost_pusd"
)

SCHEMA = (
    f"""
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    mode TEXT NOT NULL,
    feature TEXT,
    environment TEXT,
    stream INTEGER NOT NULL,
    started_us INTEGER NOT NULL,
    finished_us INTEGER,
    period TEXT NOT NULL,
    upstream_status INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cached_tokens INTEGER,
    reasoning_tokens INTEGER,
    usage_source TEXT NOT NULL,
    cost_pusd INTEGER,
    reserved_pusd INTEGER,
    status TEXT NOT NULL,
    stream_complete INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    upstream_id TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_period_tenant ON requests (period, tenant);
CREATE INDEX IF NOT EXISTS requests_in_flight ON requests (status) WHERE status = '{IN_FLIGHT}';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notifications (
    tenant TEXT NOT NULL,
    feature TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold TEXT NOT NULL,
    sent_us INTEGER NOT NULL,
    PRIMARY KEY (tenant, feature, period, threshold)
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    feature TEXT,
    environment TEXT,
    created_us INTEGER NOT NULL,
    status TEXT NOT NULL,
    output_file_id TEXT,
    recorded_us INTEGER
);
CREATE INDEX IF NOT EXISTS batches_open ON batches (recorded_us) WHERE recorded_us IS NULL;
CREATE INDEX IF NOT EXISTS batches_tenant ON batches (tenant);
CREATE TABLE IF NOT EXISTS files (
    file_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    source TEXT NOT NULL,
    batch_id TEXT
);
CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant);
"""
    + AGGREGATES_SCHEMA
)

_PLACEHOLDERS = ", ".join("?" for _ in COLUMNS)
_INSERT_BEGIN = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS})"
_INSERT_TERMINAL = f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS})"
# What `finish` sets. A terminal row is never changed again: that makes `finish` idempotent.
_FINISH_COLUMNS = (
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
)
_UPDATE_FINISH = (
    "UPDATE requests SET "
    + ", ".join(f"{c} = ?" for c in _FINISH_COLUMNS)
    + f" WHERE request_id = ? AND status = '{IN_FLIGHT}'"
)


def _finish_values(row: LedgerRow) -> tuple[Any, ...]:
    return (
        row.status,
        row.finished_us,
        row.upstream_status,
        row.prompt_tokens,
        row.completion_tokens,
        row.cached_tokens,
        row.reasoning_tokens,
        row.usage_source,
        row.cost_pusd,
        row.stream_complete,
        row.error_code,
        row.upstream_id,
        row.request_id,
    )


_Op = tuple[str, LedgerRow, asyncio.Future[bool]]


class SQLiteLedger:
    """The default, embedded ledger: a WAL-mode SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        on_commit: Callable[[int, float, bool], None] | None = None,
        on_terminal: Callable[[LedgerRow], None] | None = None,
    ) -> None:
        self.path = str(path)
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._healthy = True
        self._on_commit = on_commit
        self._on_terminal = on_terminal  # counts a row once, when it became terminal
        self.orphans_reaped = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file and schema, reap rows a crash left in flight, start the writer."""
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            # checkpoints copy the log into the database file and fsync it: that must not
            # happen on the event loop, so the writer runs them in a thread (_write_loop)
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.executescript(SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.orphans_reaped = _reap_orphans(conn)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"cannot open ledger {self.path}: {exc}") from exc
        self._conn = conn
        self._closing = False
        loop = asyncio.get_running_loop()
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
        await self._submit("begin", row)

    async def finish(self, row: LedgerRow) -> bool:
        return await self._submit("finish", row)

    async def record(self, row: LedgerRow) -> bool:
        return await self._submit("record", row)

    def _submit(self, kind: str, row: LedgerRow) -> asyncio.Future[bool]:
        if self._task is None or (self._closing and self._task.done()):
            raise LedgerUnavailable("ledger is not open")
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
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
        last_checkpoint = loop.time()
        passive: asyncio.Future[None] | None = None
        while True:
            if passive is None and loop.time() - last_checkpoint >= CHECKPOINT_INTERVAL:
                # phase 1: copy the WAL into the database beside the writer (nobody waits)
                passive = asyncio.ensure_future(asyncio.to_thread(self._checkpoint, "PASSIVE"))
            elif passive is not None and passive.done():
                # phase 2: the few frames written since, then restart the WAL so it stays
                # small; rows arriving meanwhile wait and go into the next (bigger) batch
                passive = None
                last_checkpoint = loop.time()
                await asyncio.to_thread(self._checkpoint, "RESTART", self._conn)
            if self._pending and not self._closing:
                # one more turn of the loop lets the handlers that are about to write join
                # this transaction: fewer, larger commits under load, ~10 µs more when idle
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
        try:
            conn.execute("BEGIN IMMEDIATE")
            for kind, row, _ in batch:
                if kind == "begin":
                    try:
                        conn.execute(_INSERT_BEGIN, row.values())
                        results.append(True)
                    except sqlite3.IntegrityError:  # a duplicate id: refuse this row only
                        results.append(LedgerUnavailable(f"duplicate request id {row.request_id}"))
                elif kind == "finish":
                    results.append(conn.execute(_UPDATE_FINISH, _finish_values(row)).rowcount == 1)
                else:
                    results.append(conn.execute(_INSERT_TERMINAL, row.values()).rowcount == 1)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._healthy = False
            log.error("ledger write of %d rows failed: %s", len(batch), exc)
            if self._on_commit is not None:
                self._on_commit(len(batch), time.perf_counter() - t0, False)
            return False, []
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
        finally:
            conn.close()

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
        found = await asyncio.to_thread(
            self._read,
            "SELECT tenant, feature, SUM(cost_pusd) AS cost FROM requests "
            "WHERE period = ? AND status != ? AND cost_pusd IS NOT NULL GROUP BY tenant, feature",
            (period, IN_FLIGHT),
        )
        return [(r["tenant"], r["feature"], int(r["cost"])) for r in found]

    async def usage(self, period: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """Per tenant, model, feature and environment: requests, tokens, cost, flagged rows."""
        where, params = "period = ? AND status != ?", [period, IN_FLIGHT]
        if tenant is not None:
            where += " AND tenant = ?"
            params.append(tenant)
        found = await asyncio.to_thread(
            self._read,
            "SELECT tenant, model, feature, environment, COUNT(*) AS requests, "
            "TOTAL(prompt_tokens) AS input_tokens, TOTAL(completion_tokens) AS output_tokens, "
            "SUM(cost_pusd) AS cost_pusd, SUM(usage_source = 'estimated') AS estimated, "
            "SUM(cost_pusd IS NULL AND status != 'rejected') AS cost_unknown, "
            "SUM(status = 'rejected') AS rejected "
            f"FROM requests WHERE {where} GROUP BY tenant, model, feature, environment "
            "ORDER BY tenant, model, feature, environment",
            tuple(params),
        )
        out = []
        for r in found:
            d = dict(r)
            d["input_tokens"], d["output_tokens"] = int(d["input_tokens"]), int(d["output_tokens"])
            d["cost_pusd"] = int(d["cost_pusd"] or 0)
            out.append(d)
        return out

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

    async def aggregates(self, period: str) -> list[Aggregate]:
        """What `db prune` kept of the period's rows (empty for a period never pruned)."""

        def read() -> list[sqlite3.Row]:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA busy_timeout=5000")
                conn.executescript(AGGREGATES_SCHEMA)
                return conn.execute(
                    "SELECT * FROM aggregates WHERE period = ? ORDER BY day, tenant, model", (period,)
                ).fetchall()
            finally:
                conn.close()

        found = await asyncio.to_thread(read)
        return [
            Aggregate(**{**dict(r), "feature": r["feature"] or None, "environment": r["environment"] or None})
            for r in found
        ]

    async def prune(self, before: str, periods: Periods, *, chunk: int = 20_000) -> PruneResult:
        """Fold the terminal rows of every period before `before` into aggregates, then delete them.

        Chunk by chunk, each chunk one transaction (fold and delete together, so a row is
        counted exactly once whatever happens), so a running proxy's writer waits at most one
        chunk for the lock.
        """
        return await asyncio.to_thread(self._prune, before, periods, chunk)

    def _prune(self, before: str, periods: Periods, chunk: int) -> PruneResult:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        n_rows = n_aggs = 0
        touched: set[str] = set()
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(AGGREGATES_SCHEMA)
            while True:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    found = conn.execute(
                        f"SELECT {', '.join(COLUMNS)} FROM requests WHERE period < ? AND status != ? LIMIT ?",
                        (before, IN_FLIGHT, chunk),
                    ).fetchall()
                    rows = [LedgerRow.from_mapping(r) for r in found]
                    aggs = aggregate_rows(rows, periods)
                    conn.executemany(
                        _UPSERT_AGGREGATE,
                        [
                            (*a.key()[:6], a.feature or "", a.environment or "", *a.key()[8:], *a.sums())
                            for a in aggs
                        ],
                    )
                    conn.executemany(
                        "DELETE FROM requests WHERE request_id = ?", [(r.request_id,) for r in rows]
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                n_rows += len(rows)
                n_aggs += len(aggs)
                touched.update(r.period for r in rows)
                if len(rows) < chunk:
                    break
        finally:
            conn.close()
        return PruneResult(n_rows, n_aggs, tuple(sorted(touched)))

    async def integrity_ok(self) -> bool:
        found = await asyncio.to_thread(self._read, "PRAGMA integrity_check")
        return bool(found) and found[0][0] == "ok"


def _resolve(batch: list[_Op], results: list[bool | Exception] | None, error: BaseException | None) -> None:
    for i, (_, _, fut) in enumerate(batch):
        if fut.done():
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
