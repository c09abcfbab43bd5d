"""PostgreSQL ledger (asyncpg) for several replicas sharing one database.

Same rows, statuses and idempotency as the SQLite ledger, plus what replicas need:

* **Group commit.** Handlers hand ops to one writer task that owns a connection and writes
  everything handed over meanwhile as one batch: usually a single statement over arrays
  (`unnest`), its own transaction, so a batch costs one round trip whatever its size.
* **Budgets in the database.** Table `accounts` (tenant, feature ('' = tenant-wide), period) ->
  spent, reserved is the single truth across replicas; each batch moves it for exactly the rows
  it wrote. When a begin meets a hard budget, the batch locks the accounts it touches in a fixed
  order (`ORDER BY ... FOR UPDATE`: no deadlock between replicas), admits the begins in order,
  then writes, in one transaction. A refused row is not inserted; its `begin` raises
  `BudgetExceeded`.
* **Crash recovery across replicas.** Each process has an instance id stamped on the rows it
  begins (`owner`) and a heartbeat in `instances`; only rows whose owner stopped or whose
  heartbeat is older than the lease are reaped (`orphaned`, charged their reservation), at start
  and periodically.
* **Connection loss.** The writer reconnects with backoff; while commits fail, `writable()` is
  False (readiness 503) and `begin` raises LedgerUnavailable (nothing is forwarded). A `finish`
  or `record` that cannot commit stays queued and is retried until it commits; its caller waits
  at most `commit_timeout`. Retries are idempotent (by request id and status) and exact: a
  retried op whose earlier attempt did commit is recognised by its `finished_us`.

Reads, notifications, batch jobs, file ownership and retention live in `pg_store.PostgresStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import asyncpg

from proxy.core.budgets import BudgetExceeded, budget_exceeded
from proxy.ledger import (
    COLUMNS,
    FINISH_COLUMNS,
    IN_FLIGHT,
    LedgerRow,
    LedgerUnavailable,
    now_us,
    pg_partitions,
)
from proxy.ledger.pg_sql import MOVE_ACCOUNTS_CTE as _MOVE_ACCOUNTS_CTE
from proxy.ledger.pg_sql import N_ROW as _N_ROW
from proxy.ledger.pg_sql import TERMINAL as _TERMINAL
from proxy.ledger.pg_sql import TYPES as _TYPES
from proxy.ledger.pg_sql import arrays as _arrays
from proxy.ledger.pg_sql import row_columns as _row_columns
from proxy.ledger.pg_store import PostgresStore
from proxy.ledger.rollup_sql import rollup_cte

log = logging.getLogger(__name__)

HardLimits = Callable[[], Mapping[tuple[str, str | None], int]]
_FINISH = FINISH_COLUMNS  # what `finish` sets; a terminal row is never changed again (idempotent)
# a row is found by its key, (request_id, period): the period names the one partition it is in
_FINISH_IDX = [COLUMNS.index(c) for c in ("request_id", "period", *_FINISH)]


_N_FINISH = len(_FINISH_IDX) + 1  # a finish's arrays, and the month they all share (or NULL)
# What a begin knows; a begun row's other columns are at their defaults (status in_flight).
_BEGIN = (
    "request_id", "tenant", "key_id", "model", "endpoint", "mode", "feature", "environment",
    "stream", "started_us", "period", "reserved_pusd",
)  # fmt: skip
_BEGIN_IDX = [COLUMNS.index(c) for c in _BEGIN]
_TERMINAL_IDX = [j for j, c in enumerate(COLUMNS) if c not in _BEGIN]
_N_BEGIN = len(_BEGIN)


def _update(first: int, one_month: bool) -> str:
    """Finish the rows still in flight. `one_month`: they all started in the month given as the
    last parameter, a plain value PostgreSQL prunes the other partitions with before it runs (a
    period from the arrays only prunes row by row, and the planner, pricing a lookup in every
    partition, then prefers scanning each partition's in-flight index); else that parameter is
    NULL (a batch on both sides of a month's end)."""
    month = f"${first + _N_FINISH - 1}::text"
    return f"""UPDATE requests AS r SET {", ".join(f"{c} = u.{c}" for c in _FINISH)}
    FROM unnest({_arrays(first, (_TYPES[j] for j in _FINISH_IDX))})
        AS u(request_id, period, {", ".join(_FINISH)})
    WHERE r.request_id = u.request_id AND r.period = u.period AND r.status = '{IN_FLIGHT}'
        AND {f"r.period = {month}" if one_month else f"{month} IS NULL"}
    RETURNING {", ".join(f"r.{c}" for c in _TERMINAL.split(", "))}"""


# One statement writes a whole batch: begun rows, finished rows, recorded rows, the account
# moves they cause (begin: reserved += reservation; finish: reserved -= it, spent += cost;
# record: spent += cost), and the rollup lines of the rows made terminal, counted only for the
# rows this statement inserted or made terminal. Alone it is its own transaction: one round
# trip. Accounts and rollups are upserted in key order, accounts first (PostgreSQL runs the
# unreferenced WITH parts last to first, so `acc` comes after `roll`), the order every writer
# and the reaper lock them in, so replicas cannot deadlock on them.
def _write_batch(one_month: bool) -> str:
    return f"""
WITH ins AS (
    INSERT INTO requests ({", ".join(COLUMNS)}, owner)
    SELECT * FROM unnest({_arrays(1, (*_TYPES, "text"))})
    ON CONFLICT (request_id, period) DO NOTHING
    RETURNING request_id, tenant, feature, period, reserved_pusd
), upd AS (
    {_update(_N_ROW + 1, one_month)}
), rec AS (
    INSERT INTO requests ({", ".join(COLUMNS)}, owner)
    SELECT * FROM unnest({_arrays(_N_ROW + _N_FINISH + 1, (*_TYPES, "text"))})
    ON CONFLICT (request_id, period) DO NOTHING
    RETURNING {_TERMINAL}
), moved AS (
    SELECT tenant, feature, period, 0::numeric AS spent, COALESCE(reserved_pusd, 0)::numeric AS reserved
    FROM ins
    UNION ALL SELECT tenant, feature, period, COALESCE(cost_pusd, 0), -COALESCE(reserved_pusd, 0) FROM upd
    UNION ALL SELECT tenant, feature, period, COALESCE(cost_pusd, 0), 0 FROM rec
), {rollup_cte("SELECT * FROM upd UNION ALL SELECT * FROM rec", f"${2 * _N_ROW + _N_FINISH + 1}")},
{_MOVE_ACCOUNTS_CTE}
SELECT 'b', request_id FROM ins
UNION ALL SELECT 'f', request_id FROM upd
UNION ALL SELECT 'r', request_id FROM rec
"""


# The usual batch (begins of fresh rows and finishes, nothing recorded), leaner: a begin sends
# only the 12 columns it knows, the owner once (27 parameters instead of 64: less to encode here
# and to parse there). The same rows, account moves and rollups as _write_batch.
def _write_lean(one_month: bool) -> str:
    return f"""
WITH ins AS (
    INSERT INTO requests ({", ".join(_BEGIN)}, usage_source, status, owner)
    SELECT *, 'none', '{IN_FLIGHT}', ${_N_BEGIN + 1}::text
    FROM unnest({_arrays(1, (_TYPES[j] for j in _BEGIN_IDX))})
    ON CONFLICT (request_id, period) DO NOTHING
    RETURNING request_id, tenant, feature, period, reserved_pusd
), upd AS (
    {_update(_N_BEGIN + 2, one_month)}
), moved AS (
    SELECT tenant, feature, period, 0::numeric AS spent, COALESCE(reserved_pusd, 0)::numeric AS reserved
    FROM ins
    UNION ALL SELECT tenant, feature, period, COALESCE(cost_pusd, 0), -COALESCE(reserved_pusd, 0) FROM upd
), {rollup_cte("SELECT * FROM upd", f"${_N_BEGIN + 2 + _N_FINISH}")},
{_MOVE_ACCOUNTS_CTE}
SELECT 'b', request_id FROM ins
UNION ALL SELECT 'f', request_id FROM upd
"""


# (lean, finishes of one month) -> statement
_WRITE = {
    (lean, one): (_write_lean if lean else _write_batch)(one)
    for lean in (True, False)
    for one in (True, False)
}
# a retried op whose earlier attempt committed after all: the row carries its finished_us
_ALREADY_MADE = (
    "SELECT r.request_id FROM requests AS r "
    "JOIN unnest($1::text[], $2::int8[], $3::text[], $4::text[]) "
    "AS u(request_id, finished_us, status, period) "
    "ON r.request_id = u.request_id AND r.period = u.period "
    "AND r.finished_us IS NOT DISTINCT FROM u.finished_us "
    "AND r.status = u.status"
)
_KEYS = "unnest($1::text[], $2::text[], $3::text[])"
_ENSURE_ACCOUNTS = (
    f"INSERT INTO accounts (tenant, feature, period) SELECT * FROM {_KEYS} ON CONFLICT DO NOTHING"
)
_LOCK_ACCOUNTS = (
    "SELECT tenant, feature, period, spent_pusd, reserved_pusd FROM accounts "
    f"WHERE (tenant, feature, period) IN (SELECT * FROM {_KEYS}) "
    "ORDER BY tenant, feature, period FOR UPDATE"
)
_MOVE_ACCOUNTS = (
    "UPDATE accounts AS a SET spent_pusd = a.spent_pusd + d.spent, "
    "reserved_pusd = a.reserved_pusd + d.reserved "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::numeric[]) "
    "AS d(tenant, feature, period, spent, reserved) "
    "WHERE a.tenant = d.tenant AND a.feature = d.feature AND a.period = d.period"
)
_DEAD_OWNERS = (
    f"status = '{IN_FLIGHT}' AND owner IS DISTINCT FROM $1 AND (owner IS NULL OR NOT EXISTS ("
    "SELECT 1 FROM instances AS i WHERE i.instance_id = requests.owner AND i.stopped_at IS NULL "
    "AND i.heartbeat_at > now() - make_interval(secs => $2)))"
)
# the reaper: rows in flight orphaned at their reservation, added to their rollup lines
_REAP = f"""WITH reaped AS (
    UPDATE requests SET status = 'orphaned', finished_us = $2, cost_pusd = reserved_pusd,
        usage_source = 'estimated', error_code = 'process_died'
    WHERE (request_id, period) IN (SELECT * FROM unnest($1::text[], $4::text[]))
        AND status = '{IN_FLIGHT}'
    RETURNING {_TERMINAL}
), {rollup_cte("SELECT * FROM reaped", "$3")}
SELECT tenant, feature, period, reserved_pusd FROM reaped"""
_RETRY_STATES = {"40001", "40P01"}  # serialization failure, deadlock: retry the whole batch
_DATA_CLASSES = ("22", "23", "42")  # a bad value or a bug: retrying cannot help
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 1.0  # seconds between reconnect attempts

_Key = tuple[str, str, str]  # tenant, feature ('' = tenant-wide), period


class _Op:
    __slots__ = ("fut", "kind", "retried", "row")

    def __init__(self, kind: str, row: LedgerRow, fut: asyncio.Future[bool] | None) -> None:
        self.kind, self.row, self.fut = kind, row, fut
        self.retried = False  # an earlier attempt failed: it may have committed anyway


class _Transient(Exception):
    """The batch failed for a reason a retry can fix (connection, timeout, server state)."""


class PostgresLedger(PostgresStore):
    """The shared ledger: several proxy processes, one PostgreSQL database."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        lease_seconds: float = 30.0,
        commit_timeout: float = 5.0,
        on_commit: Callable[[int, float, bool], None] | None = None,
        on_terminal: Callable[[LedgerRow], None] | None = None,
        hard_limits: HardLimits | None = None,
        timezone: str = "UTC",
    ) -> None:
        super().__init__(
            dsn,
            pool_size=pool_size,
            lease_seconds=lease_seconds,
            commit_timeout=commit_timeout,
            timezone=timezone,
        )
        self._on_commit = on_commit
        self._on_terminal = on_terminal  # counts a row once, when it became terminal
        self._hard_limits = hard_limits or dict
        self._conn: asyncpg.Connection | None = None  # the writer's own connection
        self._pending: list[_Op] = []
        self._writing: list[_Op] = []  # the batch being written
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._closing = False
        self._close_by = 0.0
        self._healthy = True
        self._known: set[_Key] = set()  # accounts known to exist (never deleted)
        self.orphans_reaped = 0  # at open
        self.reaped = 0  # by this instance since it was built
        self.migrations_applied: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate the schema, register this instance, reap dead replicas' rows, start the writer."""
        try:
            self.migrations_applied, _ = await self.migrate()
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO instances (instance_id, host, pid) VALUES ($1, $2, $3)",
                    self.instance_id,
                    socket.gethostname(),
                    os.getpid(),
                )
            self.orphans_reaped = await self.reap()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            await self._close_pool()
            raise LedgerUnavailable(f"cannot open ledger {self.where}: {self._scrub(exc)}") from None
        self._closing = False
        self._healthy = True
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._writer(), name="ledger-writer")
        self._maintenance = loop.create_task(self._maintain(), name="ledger-heartbeat")

    async def close(self) -> None:
        """Commit what is pending (retrying up to `commit_timeout`), mark this instance stopped."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._task is not None:
            self._closing = True
            self._close_by = asyncio.get_running_loop().time() + self.commit_timeout
            self._poke()
            await self._task
            self._task = None
            # rows still in flight (none after a clean drain) are anybody's to reap from now on
            with contextlib.suppress(Exception):
                await self._execute(
                    "UPDATE instances SET stopped_at = now() WHERE instance_id = $1", self.instance_id
                )
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
        await self._close_pool()

    # -- writes ----------------------------------------------------------------------------

    async def begin(self, row: LedgerRow) -> None:
        """Admit `row` against the hard budgets in the database and commit it in flight."""
        if not self._healthy:
            raise LedgerUnavailable("the ledger database is unreachable")
        await self._submit("begin", row)

    async def finish(self, row: LedgerRow) -> bool:
        return await self._bounded(self._submit("finish", row))

    async def record(self, row: LedgerRow) -> bool:
        return await self._bounded(self._submit("record", row))

    async def _bounded(self, fut: asyncio.Future[bool]) -> bool:
        """Wait at most commit_timeout; the op stays queued and commits when the database is back.

        A timer fails the caller's future instead of `wait_for(shield(...))`: the writer
        resolves the very future the handler awaits, so the handler wakes one loop turn after
        the commit rather than three (the op, not the future, is what the writer commits; a
        future failed or cancelled meanwhile is simply not resolved again).
        """
        timer = asyncio.get_running_loop().call_later(self.commit_timeout, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def _submit(self, kind: str, row: LedgerRow) -> asyncio.Future[bool]:
        if self._task is None or (self._closing and self._task.done()):
            raise LedgerUnavailable("ledger is not open")
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(kind, row, fut))
        self._poke()
        return fut

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def writable(self) -> bool:
        """True when a write would commit (the writer probes the database while it is not)."""
        return self._task is not None and not self._task.done() and self._healthy

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        except Exception:
            log.exception("the ledger writer crashed")  # readiness says 503 from now on
            raise
        finally:  # cancelled or crashed: nobody may wait forever for a commit
            batch, self._pending, self._writing = [*self._writing, *self._pending], [], []
            for op in batch:
                _fail(op, LedgerUnavailable("the ledger writer stopped"))

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = FIRST_BACKOFF
        while True:
            if self._pending and not self._closing:
                # one more turn of the loop lets handlers about to write join this batch
                # (fewer, larger commits: it matters most when several writers share accounts)
                await asyncio.sleep(0)
            if not self._pending:
                if self._closing:
                    return
                self._wake = loop.create_future()
                if self._healthy:
                    await self._wake
                    continue
                # nothing to write but the database was unreachable: probe it, with backoff
                await asyncio.wait((self._wake,), timeout=backoff)
                if not self._pending:
                    backoff = FIRST_BACKOFF if await self._probe() else min(backoff * 2, MAX_BACKOFF)
                continue
            batch, self._pending = self._pending, []
            self._writing = batch
            retry = await self._write(batch)
            self._writing = []
            if not retry:
                backoff = FIRST_BACKOFF
                continue
            # begins waiting behind a failed batch cannot commit either: 503 them now
            waiting = [op for op in self._pending if op.kind == "begin"]
            self._pending = retry + [op for op in self._pending if op.kind != "begin"]
            for op in waiting:
                _fail(op, LedgerUnavailable("the ledger database is unreachable"))
            if self._closing and loop.time() >= self._close_by:
                log.error("ledger: %d write(s) could not be committed before shutdown", len(self._pending))
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _write(self, batch: list[_Op]) -> list[_Op]:
        """Commit `batch` and resolve its futures; return the ops to retry (empty: done)."""
        t0 = time.perf_counter()
        try:
            results = await self._commit(batch)
        except _Transient as exc:
            self._count(len(batch), t0, False)
            if self._healthy:
                log.error("ledger write of %d op(s) failed: %s", len(batch), exc)
            self._healthy = False
            retry = []
            for op in batch:
                if op.kind == "begin":
                    _fail(op, LedgerUnavailable("the ledger database is unreachable"))
                    # it may have committed: make such a row terminal (nothing was forwarded)
                    abandon = _Op("finish", _abandoned(op.row), None)
                    abandon.retried = True
                    retry.append(abandon)
                else:
                    op.retried = True
                    retry.append(op)
            return retry
        except (asyncpg.PostgresError, ValueError) as exc:
            self._count(len(batch), t0, False)
            if len(batch) == 1:  # a value the database refuses: this op only fails
                log.error(
                    "ledger: request %s cannot be written: %s", batch[0].row.request_id, self._scrub(exc)
                )
                _fail(batch[0], LedgerUnavailable("the ledger refused this row"))
                return []
            half = len(batch) // 2
            return [*await self._write(batch[:half]), *await self._write(batch[half:])]
        self._healthy = True
        self._count(len(batch), t0, True)
        for op, made in zip(batch, results, strict=True):
            if made is True and op.kind != "begin" and self._on_terminal is not None:
                self._on_terminal(op.row)
            if op.fut is not None and not op.fut.done():
                if isinstance(made, BaseException):
                    op.fut.set_exception(made)
                else:
                    op.fut.set_result(made)
        return []

    def _count(self, n: int, t0: float, ok: bool) -> None:
        if self._on_commit is not None:
            self._on_commit(n, time.perf_counter() - t0, ok)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            self._conn = await asyncpg.connect(
                self._dsn,
                timeout=self.commit_timeout,
                server_settings={
                    "application_name": "together-meter-writer",
                    # a stuck peer must not hold the accounts' row locks for long
                    "lock_timeout": str(int(self.commit_timeout * 1000)),
                    "idle_in_transaction_session_timeout": str(int(self.commit_timeout * 2000)),
                    # every statement here finds its rows by key: planning the batch statement
                    # anew for each batch (a custom plan) cost more than half of the database's
                    # CPU per request at c=1 (docs/benchmarks.md, rollups section)
                    "plan_cache_mode": "force_generic_plan",
                },
            )
        return self._conn

    async def _commit(self, batch: list[_Op]) -> list[bool | Exception]:
        """Write the whole batch atomically (retried on deadlock); per-op results.

        Raises _Transient when a retry may succeed, PostgresError or ValueError (a value the
        client library cannot encode) when the batch holds something the database refuses.
        """
        for attempt in range(5):
            try:
                async with asyncio.timeout(self.commit_timeout):
                    conn = await self._connection()
                    results, created = await self._apply(conn, batch)
                self._known.update(created)
                return results
            except asyncpg.PostgresError as exc:
                # the server refused a statement: the transaction is aborted, the connection fine
                again = exc.sqlstate in _RETRY_STATES and attempt < 4
                refused = isinstance(exc.sqlstate, str) and exc.sqlstate.startswith(_DATA_CLASSES)
                if (again or refused) and await self._rollback():
                    if again or (attempt < 4 and await self._make_partitions(exc, batch)):
                        continue
                    raise
                self._drop_connection()
                raise _Transient(self._scrub(exc)) from None
            except ValueError:  # asyncpg could not encode a value (e.g. beyond BIGINT)
                self._drop_connection()
                raise
            except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
                self._drop_connection()
                raise _Transient(self._scrub(exc)) from None
        raise AssertionError("unreachable")

    async def _make_partitions(self, exc: asyncpg.PostgresError, batch: list[_Op]) -> bool:
        """A row of a month without a partition (made ahead, so rare: a clock far off): make it
        now, and write again. False when the error was another one, or the month cannot be made."""
        if exc.sqlstate != pg_partitions.NO_PARTITION or self._conn is None:
            return False
        try:  # (made here, or by another replica meanwhile)
            await pg_partitions.ensure(self._conn, {op.row.period for op in batch})
        except asyncpg.PostgresError as failed:  # e.g. not a period: the batch is split, it fails alone
            log.warning("ledger: could not make a monthly partition: %s", self._scrub(failed))
            return False
        return True

    async def _rollback(self) -> bool:
        try:
            assert self._conn is not None
            if self._conn.is_in_transaction():
                await asyncio.wait_for(self._conn.execute("ROLLBACK"), self.commit_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, AssertionError):
            self._drop_connection()
            return False
        return True

    def _drop_connection(self) -> None:
        """After an error the connection's state is unknown: close it; the server rolls back."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _apply(
        self, conn: asyncpg.Connection, batch: list[_Op]
    ) -> tuple[list[bool | Exception], list[_Key]]:
        """The batch's statements; per-op results and the accounts this transaction created.

        Usually one statement, its own transaction. A transaction of a few statements when a
        begin meets a hard budget (lock the accounts, admit in Python, then write) or when a
        retried op must be recognised.
        """
        results: list[bool | Exception] = [False] * len(batch)
        begins: list[int] = []
        finishes: list[int] = []
        records: list[int] = []
        seen: set[tuple[str, str]] = set()
        for i, op in enumerate(batch):
            if op.kind != "begin":
                if (op.kind, op.row.request_id) in seen:
                    continue  # a second op on one row in one batch: the first one decides
                seen.add((op.kind, op.row.request_id))
            (begins if op.kind == "begin" else finishes if op.kind == "finish" else records).append(i)
        limits = self._hard_limits()
        admission = bool(limits) and any(_limited(batch[i].row, limits) for i in begins)
        explicit = admission or any(op.retried for op in batch)
        created: list[_Key] = []
        admitted = begins
        if explicit:
            await conn.execute("BEGIN")
        if admission:
            keys = sorted({k for i in (*begins, *finishes, *records) for k in _account_keys(batch[i].row)})
            accounts, created = await self._lock_accounts(conn, keys)
            admitted = self._admit(batch, begins, accounts, results, limits)
        begun = [batch[i].row for i in admitted]
        months = {batch[i].row.period for i in finishes}
        month = next(iter(months)) if len(months) == 1 else None
        finish_cols = [*_row_columns([batch[i].row for i in finishes], only=_FINISH_IDX), month]
        if not records and all(_pristine(r) for r in begun):
            found = await conn.fetch(
                _WRITE[True, len(months) <= 1],
                *_row_columns(begun, only=_BEGIN_IDX),
                self.instance_id,
                *finish_cols,
                self.periods.timezone,
            )
        else:
            found = await conn.fetch(
                _WRITE[False, len(months) <= 1],
                *_row_columns(begun, self.instance_id),
                *finish_cols,
                *_row_columns([batch[i].row for i in records], None),
                self.periods.timezone,
            )
        made = {(r[0], r[1]) for r in found}
        for i in admitted:
            rid = batch[i].row.request_id
            results[i] = True if ("b", rid) in made else LedgerUnavailable(f"duplicate request id {rid}")
        for kind, idx in (("f", finishes), ("r", records)):
            for i in idx:
                results[i] = (kind, batch[i].row.request_id) in made
        if explicit:
            await self._recognise(conn, batch, [*finishes, *records], results)
            await conn.execute("COMMIT")
        return results, created

    async def _lock_accounts(
        self, conn: asyncpg.Connection, keys: list[_Key]
    ) -> tuple[dict[_Key, list[int]], list[_Key]]:
        """Lock `keys` (sorted) and read them: {key: [spent, reserved]}, and the ones created."""
        new = [k for k in keys if k not in self._known]
        created: list[_Key] = []
        accounts: dict[_Key, list[int]] = {}
        for _ in range(2):
            if new:  # accounts are never deleted: each is created once, then known
                await conn.execute(_ENSURE_ACCOUNTS, *_columns(new, 3))
                created += new
            locked = await conn.fetch(_LOCK_ACCOUNTS, *_columns(keys, 3))
            accounts = {(r[0], r[1], r[2]): [int(r[3]), int(r[4])] for r in locked}
            new = [k for k in keys if k not in accounts]  # known here but gone: create again
            if not new:
                break
        return accounts, created

    def _admit(
        self,
        batch: list[_Op],
        begins: list[int],
        accounts: dict[_Key, list[int]],
        results: list[bool | Exception],
        limits: Mapping[tuple[str, str | None], int],
    ) -> list[int]:
        """The begins that fit in their hard budgets, in batch order; the others get BudgetExceeded."""
        admitted = []
        for i in begins:
            row = batch[i].row
            amount = row.reserved_pusd or 0
            checks: list[tuple[tuple[str, str | None], _Key]] = [
                ((row.tenant, None), (row.tenant, "", row.period))
            ]
            if row.feature is not None:
                checks.append(((row.tenant, row.feature), (row.tenant, row.feature, row.period)))
            refused: BudgetExceeded | None = None
            for budget_key, key in checks:
                limit = limits.get(budget_key)
                if limit is None:
                    continue
                spent, reserved = accounts[key]
                if spent + reserved + amount > limit:
                    refused = budget_exceeded(budget_key, row.period, limit, limit - spent - reserved, amount)
                    break
            if refused is not None:
                results[i] = refused
                continue
            for _, key in checks:
                accounts[key][1] += amount
            admitted.append(i)
        return admitted

    async def _recognise(
        self, conn: asyncpg.Connection, batch: list[_Op], idx: list[int], results: list[bool | Exception]
    ) -> None:
        """Retried ops not made terminal now: made by an earlier attempt that did commit?"""
        unsure = [batch[i].row for i in idx if batch[i].retried and results[i] is not True]
        if not unsure:
            return
        found = await conn.fetch(
            _ALREADY_MADE,
            [r.request_id for r in unsure],
            [r.finished_us for r in unsure],
            [r.status for r in unsure],
            [r.period for r in unsure],
        )
        ids = {r[0] for r in found}
        for i in idx:
            if batch[i].retried and results[i] is not True and batch[i].row.request_id in ids:
                results[i] = True  # its accounts moved in that earlier transaction

    async def _probe(self) -> bool:
        """A write through the writer's connection (its heartbeat): does the database take it?"""
        try:
            async with asyncio.timeout(self.commit_timeout):
                conn = await self._connection()
                await conn.execute(
                    "UPDATE instances SET heartbeat_at = now() WHERE instance_id = $1", self.instance_id
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            self._drop_connection()
            return False
        if not self._healthy:
            log.warning("ledger database reachable again (%s)", self.where)
        self._healthy = True
        return True

    # -- heartbeat and reaper ---------------------------------------------------------------

    async def _maintain(self) -> None:
        """Heartbeat and reap every lease/3 seconds; a failure makes the writer probe."""
        interval = max(self.lease_seconds / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._execute(
                    "UPDATE instances SET heartbeat_at = now(), stopped_at = NULL WHERE instance_id = $1",
                    self.instance_id,
                )
                await self.reap()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("ledger heartbeat failed: %s", self._scrub(exc))
                self._healthy = False
                self._poke()
                continue
            # the next heartbeat tries again
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                await self._ahead()

    async def _ahead(self) -> None:
        """When the month changed: make sure the partitions of this month and the next exist."""
        if pg_partitions.ahead(self.periods, now_us()) == self.ahead:
            return
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            await self.make_ahead(conn)

    async def reap(self, limit: int = 10_000) -> int:
        """Rows in flight whose owner's heartbeat is older than the lease become `orphaned`.

        Charged their reservation (the upper bound priced before forwarding), and settled in
        the accounts in the same transaction. Never rows of a live replica, nor our own.
        """
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            candidates = await conn.fetch(
                f"SELECT request_id, tenant, feature, period FROM requests WHERE {_DEAD_OWNERS} LIMIT $3",
                self.instance_id,
                float(self.lease_seconds),
                limit,
            )
            if not candidates:
                return 0
            keys = sorted({k for r in candidates for k in _key_pairs(r["tenant"], r["feature"], r["period"])})
            async with conn.transaction():
                await conn.execute(_ENSURE_ACCOUNTS, *_columns(keys, 3))
                await conn.fetch(_LOCK_ACCOUNTS, *_columns(keys, 3))  # accounts first, then rollups
                reaped = await conn.fetch(
                    _REAP,
                    [r["request_id"] for r in candidates],
                    now_us(),
                    self.periods.timezone,
                    [r["period"] for r in candidates],
                )
                delta: dict[_Key, list[int]] = {}
                for r in reaped:
                    amount = r["reserved_pusd"] or 0
                    for key in _key_pairs(r["tenant"], r["feature"], r["period"]):
                        d = delta.setdefault(key, [0, 0])
                        d[0] += amount
                        d[1] -= amount
                moves = sorted(delta.items())
                if moves:
                    await conn.execute(
                        _MOVE_ACCOUNTS,
                        *_columns([k for k, _ in moves], 3),
                        [v[0] for _, v in moves],
                        [v[1] for _, v in moves],
                    )
        if reaped:
            self.reaped += len(reaped)
            log.warning("reaper: %d request(s) left in flight by a dead replica -> orphaned", len(reaped))
        return len(reaped)


def _key_pairs(tenant: str, feature: str | None, period: str) -> list[_Key]:
    keys = [(tenant, "", period)]
    if feature is not None:
        keys.append((tenant, feature, period))
    return keys


def _account_keys(row: LedgerRow) -> list[_Key]:
    return _key_pairs(row.tenant, row.feature, row.period)


def _limited(row: LedgerRow, limits: Mapping[tuple[str, str | None], int]) -> bool:
    """Does a hard budget apply to this row (its tenant's, or its tenant's feature's)?"""
    return (row.tenant, None) in limits or (row.feature is not None and (row.tenant, row.feature) in limits)


def _columns(items: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    cols: list[list[Any]] = [[] for _ in range(width)]
    for item in items:
        for j in range(width):
            cols[j].append(item[j])
    return cols


_PRISTINE = [LedgerRow("", "", "", "", "", "", None, None, False, 0, "").values()[j] for j in _TERMINAL_IDX]


def _pristine(row: LedgerRow) -> bool:
    """A row as `begin` usually gets it: in flight, every other column at its default."""
    values = row.values()
    return [values[j] for j in _TERMINAL_IDX] == _PRISTINE


def _abandoned(row: LedgerRow) -> LedgerRow:
    """A begin whose commit is unknown: if the row exists, it ends `rejected` (nothing was forwarded)."""
    return row.terminal("rejected", cost_pusd=0, error_code="ledger_unavailable")


def _fail(op: _Op, exc: Exception) -> None:
    if op.fut is not None and not op.fut.done():
        op.fut.set_exception(exc)


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_exception(LedgerUnavailable("the ledger did not commit in time; the row is queued"))
