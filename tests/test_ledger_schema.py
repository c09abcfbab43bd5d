"""One source for the ledger's columns (records.LEDGER_COLUMNS): the SQLite schema is made from
it, and the PostgreSQL migrations, the export format and the writers must agree with it."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import asyncpg

from proxy.core.records import COLUMNS, FINISH_COLUMNS, LEDGER_COLUMNS, LedgerRow
from proxy.core.retention import DERIVED_FIELDS, EXPORT_FIELDS
from proxy.ledger.migrate import migrate
from proxy.ledger.pg_sql import TYPES
from proxy.ledger.sqlite import SQLiteLedger

PG_TYPES = {"text": "text", "int": "bigint", "int4": "integer", "bool": "boolean"}


def test_the_row_the_columns_and_what_finish_sets_agree() -> None:
    row = LedgerRow("r", "t", "k", "m", "chat", "serverless", "f", "e", True, 7, "2026-01", "ok", 9, 200,
                    1, 2, 3, 4, "upstream", 5, 6, True, "x", "u", "megapixel", 8)  # fmt: skip
    assert dict(zip(COLUMNS, row.values(), strict=True)) == {c: getattr(row, c) for c in COLUMNS}
    assert set(FINISH_COLUMNS) <= set(COLUMNS) and len(TYPES) == len(COLUMNS)
    assert set(COLUMNS) <= set(EXPORT_FIELDS)  # every column exported (plus derived forms)
    assert not set(EXPORT_FIELDS) - set(COLUMNS) - DERIVED_FIELDS - {"started_at", "finished_at", "cost_usd"}


async def test_sqlite_requests_table_is_the_column_list(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    await ledger.open()
    await ledger.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "l.db")) as db:
        info = db.execute("PRAGMA table_info(requests)").fetchall()
    assert [(name, bool(notnull) or bool(pk)) for _, name, _, notnull, _, pk in info] == [
        (c.name, c.not_null) for c in LEDGER_COLUMNS
    ]


async def test_postgres_migrations_make_the_column_list(pg_dsn: str) -> None:
    """0001 ... the latest: the same names, types, nullability and defaults (plus `owner`)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        found = await conn.fetch(
            "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_name = 'requests' AND table_schema = current_schema() ORDER BY ordinal_position"
        )
    finally:
        await conn.close()
    columns = {r["column_name"]: r for r in found}
    assert set(columns) == {*COLUMNS, "owner"}
    for c in LEDGER_COLUMNS:
        r = columns[c.name]
        assert r["data_type"] == PG_TYPES[c.kind], c.name
        assert (r["is_nullable"] == "NO") == c.not_null, c.name
        default = r["column_default"]
        assert (default.split("::")[0] if default else None) == c.default, c.name
