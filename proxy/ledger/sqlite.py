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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import COLUMNS, IN_FLIGHT, LedgerRow, LedgerUnavailable, now_us

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1

SCHEMA = f"""
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
    reserved_pusd INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    stream_complete INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    upstream_id TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_period_tenant ON requests (period, tenant);
CREATE INDEX IF NOT EXISTS requests_in_flight ON requests (status) WHERE status = '{IN_FLIGHT}';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_PLACEHOLDERS = ", ".join("?" for _ in COLUMNS)
_INSERT_BEGIN = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS})"
# A terminal write never overwrites a terminal row: that is what makes `finish` idempotent.
_UPSERT_FINISH = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS}) "
    "ON CONFLICT (request_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "request_id")
    + f" WHERE requests.status = '{IN_FLIGHT}'"
)

_Op = tuple[str, LedgerRow, asyncio.Future[bool]]


class SQLiteLedger:
    """The default, embedded ledger: a WAL-mode SQLite file."""

    def __init__(self, path: str | Path, *, synchronous: str = "normal",
                 on_commit: Callable[[int, float, bool], None] | None = None) -> None:
        self.path = str(path)
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._healthy = True
        self._on_commit = on_commit
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
            conn.executescript(SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            self.orphans_reaped = _reap_orphans(conn)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"cannot open ledger {self.path}: {exc}") from exc
        self._conn = conn
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._writer(), name="ledger-writer")

    async def close(self) -> None:
        """Commit what is pending, then close the connection."""
        if self._task is None:
            return
        self._closing = True
        self._poke()
        await self._task
        self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writes ----------------------------------------------------------------------------

    async def begin(self, row: LedgerRow) -> None:
        await self._submit("begin", row)

    async def finish(self, row: LedgerRow) -> bool:
        return await self._submit("finish", row)

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
        return self._task is not None and not self._task.done() and self._healthy

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        finally:  # cancelled or crashed: nobody may wait forever for a commit
            batch, self._pending = self._pending, []
            _resolve(batch, None, LedgerUnavailable("the ledger writer stopped"))

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake = loop.create_future()
                await self._wake
                continue
            batch, self._pending = self._pending, []
            if self.synchronous == "FULL":
                ok, results = await asyncio.to_thread(self._write, batch)
            else:
                ok, results = self._write(batch)
            _resolve(batch, results if ok else None,
                     None if ok else LedgerUnavailable("the ledger could not commit"))

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
                else:
                    results.append(conn.execute(_UPSERT_FINISH, row.values()).rowcount == 1)
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

    async def rows(self, where: str = "", params: tuple[Any, ...] = ()) -> list[LedgerRow]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM requests {where} ORDER BY started_us"
        found = await asyncio.to_thread(self._read, sql, params)
        return [LedgerRow.from_mapping(r) for r in found]

    async def spend_by_tenant(self, period: str) -> dict[str, int]:
        """Month-to-date spend per tenant in pico-USD, summed exactly in Python."""
        found = await asyncio.to_thread(
            self._read,
            "SELECT tenant, cost_pusd, reserved_pusd, status FROM requests WHERE period = ?",
            (period,),
        )
        spend: dict[str, int] = {}
        for r in found:
            cost = r["cost_pusd"]
            if cost is not None and r["status"] != IN_FLIGHT:
                spend[r["tenant"]] = spend.get(r["tenant"], 0) + cost
        return spend

    async def integrity_ok(self) -> bool:
        found = await asyncio.to_thread(self._read, "PRAGMA integrity_check")
        return bool(found) and found[0][0] == "ok"


def _resolve(batch: list[_Op], results: list[bool | Exception] | None,
             error: BaseException | None) -> None:
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
