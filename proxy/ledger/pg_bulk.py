"""Bulk work on the PostgreSQL ledger: `db import` (`db prune` is in pg_partitions.py).

An import is one transaction (all of the file or nothing): each chunk is one statement that
inserts the rows not there yet and, for exactly those rows, moves the budget accounts and sums
them into rollup lines, as the writer does (postgres.py); the lines join `rollups` at the end.
A month without its partition gets one first, committed apart (an empty partition left by an
import that failed is harmless).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import asyncpg

from proxy.core.records import COLUMNS, LedgerRow
from proxy.core.retention import ImportConflict, ImportResult, Numbered, dedupe, difference
from proxy.ledger import pg_partitions
from proxy.ledger.pg_sql import MOVE_ACCOUNTS_CTE, N_ROW, TERMINAL, TYPES, arrays, row_columns
from proxy.ledger.rollup_sql import MERGE_ROLLUPS, rollup_cte

MakePartitions = Callable[[set[str]], Awaitable[object]]

_UNNEST = f"unnest({arrays(1, TYPES)}) AS u({', '.join(COLUMNS)})"
_R, _U = ", ".join(f"r.{c}" for c in COLUMNS), ", ".join(f"u.{c}" for c in COLUMNS)
_DIFFERENT = (
    f"SELECT u.request_id FROM {_UNNEST} JOIN requests AS r USING (request_id) "
    f"WHERE ({_R}) IS DISTINCT FROM ({_U}) LIMIT 1"
)
# the rows not there yet, their account moves (spent += cost) and rollup lines, in one statement
_IMPORT = f"""WITH rec AS (
    INSERT INTO requests ({", ".join(COLUMNS)}, owner)
    SELECT * FROM unnest({arrays(1, (*TYPES, "text"))})
    ON CONFLICT (request_id, period) DO NOTHING
    RETURNING {TERMINAL}
), moved AS (
    SELECT tenant, feature, period, COALESCE(cost_pusd, 0)::numeric AS spent, 0::numeric AS reserved FROM rec
), {rollup_cte("SELECT * FROM rec", f"${N_ROW + 1}", "pending_rollups")},
{MOVE_ACCOUNTS_CTE}
SELECT COUNT(*) FROM rec"""


async def import_rows(
    conn: asyncpg.Connection, records: Iterable[Numbered], timezone: str, partitions: MakePartitions
) -> ImportResult:
    """Insert the rows not in the ledger yet, in one transaction; ImportConflict (nothing imported)
    when a request id is there with other content. Rows of periods `db prune` deleted rows of are
    skipped: their rollups count them already. `partitions` makes the months' partitions missing
    (on another connection: committed at once, no lock held through the import)."""
    t0 = time.perf_counter()
    read = added = present = pruned = 0
    async with conn.transaction():
        # the file's lines are summed apart, then added to `rollups` once each at the end: a line
        # updated per chunk would leave thousands of dead versions of itself behind (MVCC)
        await conn.execute("CREATE TEMP TABLE pending_rollups (LIKE rollups INCLUDING ALL) ON COMMIT DROP")
        skip = {str(r[0]) for r in await conn.fetch(pg_partitions.PRUNED_PERIODS)}
        made = set(await pg_partitions.attached(conn))
        for batch in _chunks(records, 5000):
            read += len(batch)
            kept = [(n, r) for n, r in batch if r.period not in skip]
            pruned += len(batch) - len(kept)
            unique = dedupe(kept)
            if missing := {r.period for _, r in unique} - made:
                await partitions(missing)
                made |= missing
            cols = row_columns([r for _, r in unique], None)
            n = int(await conn.fetchval(_IMPORT, *cols, timezone))
            if n < len(unique):  # some were there: the same rows, or a conflict (all rolled back)
                await _check_same(conn, unique, cols[: len(TYPES)])
            added += n
            present += len(kept) - n
        await conn.execute(MERGE_ROLLUPS)
    return ImportResult(read, added, present, pruned, time.perf_counter() - t0)


def _chunks(records: Iterable[Numbered], size: int) -> Iterator[list[Numbered]]:
    it = iter(records)
    while batch := list(itertools.islice(it, size)):
        yield batch


async def _check_same(conn: asyncpg.Connection, unique: list[Numbered], cols: list[list[Any]]) -> None:
    """After the chunk's insert: a row of it not inserted because its id is in the ledger (under
    any period: the id alone is joined) with other content is a conflict."""
    request_id = await conn.fetchval(_DIFFERENT, *cols)
    if request_id is None:
        return
    line, row = next((n, r) for n, r in unique if r.request_id == request_id)
    there = await conn.fetchrow(
        f"SELECT {', '.join(COLUMNS)} FROM requests WHERE request_id = $1", request_id
    )
    raise ImportConflict(
        f"line {line}: request_id {request_id} is already in the ledger with other content "
        f"({difference(LedgerRow.from_mapping(there), row)})"
    )
