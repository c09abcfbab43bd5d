"""Monthly partitions of the PostgreSQL `requests` table (migration 0006): made ahead, pruned whole.

`requests` is LIST-partitioned on `period`, one table per month (`requests_2026_11`), with no
DEFAULT partition:

* **Made ahead.** The current and the next month's partitions exist from the first start (the
  migration, then every `open`), and each replica makes the next month's as soon as its month
  changes (its heartbeat); a writer or `db import` that still meets a month without one makes it
  on demand and writes again. Every replica makes them through `requests_partition(period)`,
  which takes one advisory lock and does nothing when the partition exists: replicas starting
  together cannot race. It creates the table apart and then ATTACHes it, which no reader or
  writer waits for.
* **Pruned whole.** `db prune` detaches a past month's partition (DETACH ... CONCURRENTLY: writers
  and readers go on meanwhile), counts its rows and drops it, after marking the month pruned (its
  rollups hold its sums, `db import` skips it). A month that still has an `in_flight` row, or a
  user that does not own `requests`, falls back to deleting rows a chunk at a time (as before
  0006). An interrupted prune is finished by the next.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import asyncpg

from proxy.core.budgets import Periods
from proxy.core.records import IN_FLIGHT
from proxy.core.retention import PruneResult

log = logging.getLogger(__name__)

PARTITION_LOCK = 7_312_667_114_020_160_006  # pg_advisory_xact_lock key: partitions being made
NO_PARTITION = "23514"  # "no partition of relation ... found for row" (check_violation)
_BOUND_RE = re.compile(r"^FOR VALUES IN \('(\d{4}-\d{2})'\)$")
_LEFTOVER_RE = re.compile(r"^requests_(\d{4})_(\d{2})$")
_PARTITIONS = """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass('requests')"""
# tables named like a month's partition that are not one: detached by an interrupted prune
_DETACHED = """SELECT c.relname FROM pg_class AS c
WHERE c.relkind = 'r' AND c.relname ~ '^requests_[0-9]{4}_[0-9]{2}$' AND NOT c.relispartition
AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass('requests'))"""
PRUNED_PERIODS = "SELECT substr(key, 8) FROM meta WHERE key LIKE 'pruned:%'"
LONG = 3600.0  # seconds a detach may wait for readers, or a count take
_MARK_PRUNED = (
    "INSERT INTO meta SELECT 'pruned:' || p, '1' FROM unnest($1::text[]) AS p ON CONFLICT (key) DO NOTHING"
)


def ahead(periods: Periods, now_us: int) -> tuple[str, str]:
    """The current month and the next, in the budgets' time zone: the partitions kept made ahead."""
    current = periods.of(now_us)
    return current, periods.of(int(periods.bounds(current)[1] * 1_000_000))


async def partitioned(conn: asyncpg.Connection) -> bool:
    """Is `requests` partitioned (migration 0006 applied)?"""
    kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = to_regclass('requests')")
    return bool(kind == "p")


async def attached(conn: asyncpg.Connection) -> dict[str, str]:
    """period -> partition name, of the months attached (not being detached)."""
    found = {}
    for name, bound, pending in await conn.fetch(_PARTITIONS):
        m = _BOUND_RE.match(bound or "")
        if m is not None and not pending:
            found[m.group(1)] = name
    return found


async def ensure(conn: asyncpg.Connection, periods: Iterable[str], lock_timeout: float = 5.0) -> list[str]:
    """Make the partitions of `periods` not made yet (race-free across replicas); the ones made.

    Raises asyncpg errors: a period that is not YYYY-MM (22023), a lock not had in time.
    """
    if not await partitioned(conn):
        return []
    missing = sorted(set(periods) - set(await attached(conn)))
    made = []
    for period in missing:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout * 1000)}")
            if await conn.fetchval("SELECT requests_partition($1)", period):
                made.append(period)
    if made:
        log.info("ledger: monthly partition(s) made: %s", ", ".join(made))
    return made


# -- retention: db prune --------------------------------------------------------------------------


async def prune(conn: asyncpg.Connection, before: str, chunk: int) -> PruneResult:
    """The terminal rows of every period before `before` out of the ledger: their partitions
    detached and dropped, or (a month with rows in flight, a user not owning `requests`, a ledger
    before migration 0006) deleted a chunk per transaction. Their rollups stay."""
    if not await partitioned(conn):
        return PruneResult(*await _delete_rows(conn, "<", before, chunk))
    n_rows = 0
    touched: set[str] = set()
    for name, _, pending in await conn.fetch(_PARTITIONS):
        if pending:  # a DETACH ... CONCURRENTLY that was interrupted
            await conn.execute(f"ALTER TABLE requests DETACH PARTITION {_ident(name)} FINALIZE", timeout=LONG)
    for period, name in sorted((await attached(conn)).items()):
        if period >= before or await _detach(conn, period, name):
            continue
        n, periods = await _delete_rows(conn, "=", period, chunk)
        n_rows += n
        touched.update(periods)
    pruned = {
        str(r[0]) for r in await conn.fetch("SELECT substr(key, 8) FROM meta WHERE key LIKE 'pruned:%'")
    }
    for name in [r[0] for r in await conn.fetch(_DETACHED)]:
        m = _LEFTOVER_RE.match(name)
        period = f"{m.group(1)}-{m.group(2)}" if m else ""
        if not period or period >= before:
            continue
        n = int(await conn.fetchval(f"SELECT count(*) FROM {_ident(name)}", timeout=LONG))
        if n and period not in pruned:  # not detached by a prune (which marks the month first)
            log.warning("db prune: table %s is not a partition of requests; left alone", name)
            continue
        await conn.execute(f"DROP TABLE {_ident(name)}")
        n_rows += n
        touched.update([period] if n else [])
        log.info("db prune: partition %s dropped (%d row(s))", name, n)
    return PruneResult(n_rows, tuple(sorted(touched)))


async def _detach(conn: asyncpg.Connection, period: str, name: str) -> bool:
    """Detach a month's partition (to be dropped); False when its rows must be deleted instead."""
    if await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM requests WHERE period = $1 AND status = '{IN_FLIGHT}')", period
    ):
        log.warning(
            "db prune: %s has rows in flight (the reaper settles them): deleting its other rows", period
        )
        return False
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM requests WHERE period = $1)", period):
        # first: once detached its rows are out of the ledger, and `db import` must skip them
        await conn.execute(_MARK_PRUNED, [period])
    try:
        # waits for the transactions that may still read it (an export...), blocks none
        await conn.execute(f"ALTER TABLE requests DETACH PARTITION {_ident(name)} CONCURRENTLY", timeout=LONG)
    except asyncpg.InsufficientPrivilegeError:
        log.warning(
            "db prune: this database user does not own the table requests, so it deletes the rows of %s one "
            "chunk at a time; run `db prune` as the user that ran the migrations to drop whole months",
            period,
        )
        return False
    return True


async def _delete_rows(
    conn: asyncpg.Connection, op: str, period: str, chunk: int
) -> tuple[int, tuple[str, ...]]:
    """Delete the terminal rows of the periods `op` (< or =) `period`, a chunk per transaction."""
    n_rows = 0
    touched: set[str] = set()
    for _ in range(1_000_000_000 // chunk):  # bounded: a billion rows
        async with conn.transaction():
            found = await conn.fetch(
                f"DELETE FROM requests WHERE period {op} $1 AND request_id IN (SELECT request_id FROM "
                f"requests WHERE period {op} $1 AND status <> '{IN_FLIGHT}' LIMIT $2) RETURNING period",
                period,
                chunk,
            )
            periods = sorted({str(r[0]) for r in found})
            await conn.execute(_MARK_PRUNED, periods)
        n_rows += len(found)
        touched.update(periods)
        if len(found) < chunk:
            break
    return n_rows, tuple(sorted(touched))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
