"""Bulk work on the SQLite ledger beside the writer: `db import` and `db prune`.

Both run in a worker thread on a connection of their own. An import is one transaction (all of
the file or nothing); the triggers of sqlite_schema.py add every row it inserts to the rollups
in that transaction. A prune deletes old terminal rows chunk by chunk; their rollups stay.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Iterable, Iterator

from proxy.core.records import COLUMNS, IN_FLIGHT, LedgerRow
from proxy.core.retention import ImportConflict, ImportResult, Numbered, PruneResult, dedupe, difference
from proxy.ledger.sqlite_schema import pruned_periods

_COLS = ", ".join(COLUMNS)
_STAGE = f"CREATE TEMP TABLE IF NOT EXISTS staged (line INTEGER NOT NULL, {_COLS})"
_DIFFERENT = (
    f"SELECT s.line, s.request_id FROM temp.staged AS s JOIN requests AS r USING (request_id) "
    f"WHERE ({', '.join(f'r.{c}' for c in COLUMNS)}) IS NOT ({', '.join(f's.{c}' for c in COLUMNS)}) "
    "ORDER BY s.line LIMIT 1"
)
_INSERT_NEW = (
    f"INSERT OR IGNORE INTO requests ({_COLS}) SELECT {_COLS} FROM temp.staged WHERE true ORDER BY line"
)


def import_rows(conn: sqlite3.Connection, records: Iterable[Numbered], chunk: int = 5000) -> ImportResult:
    """Insert the rows not in the ledger yet, in one transaction; ImportConflict (nothing imported)
    when a request id is there with other content. Rows of periods `db prune` deleted rows of are
    skipped: their rollups count them already."""
    t0 = time.perf_counter()
    counts = [0, 0, 0, 0]  # read, added, present, pruned
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_STAGE)
        skip = pruned_periods(conn)
        for batch in _chunks(records, chunk):
            counts[0] += len(batch)
            kept = [(n, r) for n, r in batch if r.period not in skip]
            counts[3] += len(batch) - len(kept)
            unique = dedupe(kept)
            conn.execute("DELETE FROM temp.staged")
            conn.executemany(
                f"INSERT INTO temp.staged VALUES (?, {', '.join('?' for _ in COLUMNS)})",
                [(n, *r.values()) for n, r in unique],
            )
            _check_same(conn)
            conn.execute(_INSERT_NEW)
            added = conn.execute("SELECT changes()").fetchone()[0]
            counts[1] += added
            counts[2] += len(kept) - added
        conn.execute("DELETE FROM temp.staged")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    read, added, present, pruned = counts
    return ImportResult(read, added, present, pruned, time.perf_counter() - t0)


def _chunks(records: Iterable[Numbered], size: int) -> Iterator[list[Numbered]]:
    it = iter(records)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _check_same(conn: sqlite3.Connection) -> None:
    found = conn.execute(_DIFFERENT).fetchone()
    if found is None:
        return
    line, request_id = found
    cols = ", ".join(COLUMNS)
    conn.row_factory = sqlite3.Row
    try:
        there = conn.execute(f"SELECT {cols} FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        here = conn.execute(f"SELECT {cols} FROM temp.staged WHERE line = ?", (line,)).fetchone()
    finally:
        conn.row_factory = None
    raise ImportConflict(
        f"line {line}: request_id {request_id} is already in the ledger with other content "
        f"({difference(LedgerRow.from_mapping(there), LedgerRow.from_mapping(here))})"
    )


def prune(conn: sqlite3.Connection, before: str, chunk: int) -> PruneResult:
    """Delete the terminal rows of every period before `before`, a chunk per transaction."""
    n_rows = 0
    touched: set[str] = set()
    for _ in range(1_000_000_000 // chunk):  # bounded: a billion rows
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(
                "DELETE FROM requests WHERE request_id IN (SELECT request_id FROM requests "
                "WHERE period < ? AND status != ? LIMIT ?) RETURNING period",
                (before, IN_FLIGHT, chunk),
            ).fetchall()
            conn.executemany(
                "INSERT OR IGNORE INTO meta VALUES ('pruned:' || ?, '1')", {(p,) for (p,) in found}
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        n_rows += len(found)
        touched.update(p for (p,) in found)
        if len(found) < chunk:
            break
    return PruneResult(n_rows, tuple(sorted(touched)))
