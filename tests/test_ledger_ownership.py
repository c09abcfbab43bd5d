"""Who owns which file and batch, on both ledger backends: the same behaviour on SQLite and PostgreSQL.

PostgreSQL runs on 127.0.0.1:5432 with a fresh database per test (tests/pg.py); without it those
cases are skipped loudly, never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.ledger import BatchJob, OwnedFile, now_us
from proxy.ledger.migrate import MIGRATIONS_DIR, available, migrate
from proxy.ledger.postgres import PostgresLedger
from proxy.ledger.sqlite import SQLiteLedger
from tests.pg import pg_database

MakeLedger = Callable[[], Any]  # a new, unopened ledger on the test's database


@pytest.fixture(params=["sqlite", "postgres"])
async def make_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeLedger]:
    """Builds ledgers on one database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield lambda: SQLiteLedger(tmp_path / "ledger.db")
        return
    async with pg_database() as dsn:
        yield lambda: PostgresLedger(dsn)


@contextlib.asynccontextmanager
async def opened(make: MakeLedger) -> AsyncIterator[Any]:
    ledger = make()
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.close()


def owned(file_id: str, tenant: str, source: str = "upload", batch_id: str | None = None) -> OwnedFile:
    return OwnedFile(file_id, tenant, f"key-{tenant}", now_us(), source, batch_id)


async def stored(ledger: Any, file_id: str) -> OwnedFile | None:
    """The `files` row as the database holds it (read around the ledger)."""
    sql = "SELECT file_id, tenant, key_id, created_us, source, batch_id FROM files WHERE file_id = "
    if isinstance(ledger, SQLiteLedger):
        with contextlib.closing(sqlite3.connect(ledger.path)) as db:
            found = db.execute(sql + "?", (file_id,)).fetchone()
    else:
        conn = await asyncpg.connect(ledger._dsn)
        try:
            found = await conn.fetchrow(sql + "$1", file_id)
        finally:
            await conn.close()
    return None if found is None else OwnedFile(*found)


def batch(batch_id: str, tenant: str) -> BatchJob:
    return BatchJob(batch_id, tenant, f"key-{tenant}", None, "prod", now_us(), "VALIDATING")


async def test_a_file_and_a_batch_belong_to_the_tenant_that_added_them(make_ledger: MakeLedger) -> None:
    """add_file/add_batch record the tenant; *_owner names it and *_of lists the ids."""
    async with opened(make_ledger) as ledger:
        assert await ledger.add_file(owned("file-in", "acme")) is True
        assert await ledger.add_batch(batch("batch-1", "acme")) is True
        assert await ledger.add_file(owned("file-out", "acme", "batch_output", "batch-1")) is True
        err = owned("file-err", "acme", "batch_error", "batch-1")
        assert await ledger.add_file(err) is True
        assert await stored(ledger, "file-err") == err
        assert await ledger.file_owner("file-out") == "acme"
        assert await ledger.files_of("acme") == {"file-in", "file-out", "file-err"}
        assert await ledger.batch_owner("batch-1") == "acme"
        assert await ledger.batches_of("acme") == {"batch-1"}


async def test_the_first_owner_stays(make_ledger: MakeLedger) -> None:
    """A known file or batch id added again, by anyone, returns False and never changes hands."""
    async with opened(make_ledger) as ledger:
        assert await ledger.add_file(owned("file-1", "acme")) is True
        first = await stored(ledger, "file-1")
        assert await ledger.add_file(owned("file-1", "globex", "batch_output", "batch-x")) is False
        assert await ledger.add_file(owned("file-1", "acme")) is False
        assert await ledger.add_batch(batch("batch-1", "acme")) is True
        assert await ledger.add_batch(batch("batch-1", "globex")) is False
        assert (await ledger.file_owner("file-1"), await ledger.batch_owner("batch-1")) == ("acme", "acme")
        assert await stored(ledger, "file-1") == first  # not one column of the first record changed
        assert (await ledger.files_of("globex"), await ledger.batches_of("globex")) == (set(), set())


async def test_concurrent_claims_of_one_file_have_one_winner(make_ledger: MakeLedger) -> None:
    """Ten tenants add one file id at once: exactly one add returns True, and that tenant owns it."""
    async with opened(make_ledger) as ledger:
        tenants = [f"t{i}" for i in range(10)]
        made = await asyncio.gather(*(ledger.add_file(owned("file-race", t)) for t in tenants))
        assert made.count(True) == 1
        assert await ledger.file_owner("file-race") == tenants[made.index(True)]


async def test_unknown_ids_have_no_owner(make_ledger: MakeLedger) -> None:
    """An id the ledger never saw has no owner; a tenant that owns nothing gets empty sets."""
    async with opened(make_ledger) as ledger:
        await ledger.add_file(owned("file-1", "acme"))
        await ledger.add_batch(batch("batch-1", "acme"))
        assert await ledger.file_owner("file-unknown") is None
        assert await ledger.batch_owner("batch-unknown") is None
        assert await ledger.file_owner("batch-1") is None  # a batch id is not a file id
        assert (await ledger.files_of("nobody"), await ledger.batches_of("nobody")) == (set(), set())


async def test_tenants_see_only_their_own_ids(make_ledger: MakeLedger) -> None:
    """files_of and batches_of of one tenant never hold another tenant's ids."""
    async with opened(make_ledger) as ledger:
        for tenant in ("acme", "globex", "acme-2"):  # a tenant name prefixing another's
            await ledger.add_batch(batch(f"batch-{tenant}", tenant))
            await ledger.add_file(owned(f"file-{tenant}", tenant))
            await ledger.add_file(owned(f"out-{tenant}", tenant, "batch_output", f"batch-{tenant}"))
        for tenant in ("acme", "globex", "acme-2"):
            assert await ledger.files_of(tenant) == {f"file-{tenant}", f"out-{tenant}"}
            assert await ledger.batches_of(tenant) == {f"batch-{tenant}"}
            assert await ledger.file_owner(f"out-{tenant}") == tenant


async def test_ownership_survives_close_and_reopen(make_ledger: MakeLedger) -> None:
    """What one ledger recorded, a ledger opened later on the same database still knows."""
    async with opened(make_ledger) as ledger:
        await ledger.add_file(owned("file-1", "acme"))
        await ledger.add_batch(batch("batch-1", "globex"))
    async with opened(make_ledger) as ledger:
        assert await ledger.file_owner("file-1") == "acme"
        assert await ledger.batch_owner("batch-1") == "globex"
        assert await ledger.add_file(owned("file-1", "globex")) is False
        assert (await ledger.files_of("acme"), await ledger.batches_of("globex")) == ({"file-1"}, {"batch-1"})


async def test_an_older_sqlite_file_gains_the_files_table(tmp_path: Path) -> None:
    """A ledger file from before file ownership (no `files` table) gains it at open; its batches stay."""
    path = tmp_path / "ledger.db"
    async with opened(lambda: SQLiteLedger(path)) as ledger:
        await ledger.add_batch(batch("batch-old", "acme"))
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE files; DROP INDEX batches_tenant;")  # as the earlier schema had it
    conn.close()
    async with opened(lambda: SQLiteLedger(path)) as ledger:
        assert await ledger.batch_owner("batch-old") == "acme"
        assert await ledger.add_file(owned("file-new", "acme", "batch_output", "batch-old")) is True
        assert await ledger.files_of("acme") == {"file-new"}


async def test_a_version_1_postgres_database_gains_the_files_table(tmp_path: Path) -> None:
    """A database migrated to version 1 only (with batches) is migrated at open: files added, batches kept."""
    first = available()[0]
    assert first.label == "0001_initial"
    only_first = tmp_path / "migrations"
    only_first.mkdir()
    shutil.copy(MIGRATIONS_DIR / f"{first.label}.sql", only_first)
    async with pg_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            assert [m.label for m in await migrate(conn, only_first)] == ["0001_initial"]
            assert await conn.fetchval("SELECT to_regclass('files') IS NULL")
            await conn.execute(
                "INSERT INTO batches VALUES "
                "('batch-old', 'acme', 'k', NULL, NULL, 1, 'COMPLETED', 'file-o', 2)"
            )
        finally:
            await conn.close()
        ledger = PostgresLedger(dsn)
        await ledger.open()
        try:
            assert ledger.migrations_applied == [m.label for m in available()[1:]]
            assert "0002_owned_files" in ledger.migrations_applied
            (old,) = await ledger.batches()
            assert (old.batch_id, old.tenant, old.output_file_id, old.recorded_us) == (
                "batch-old",
                "acme",
                "file-o",
                2,
            )
            assert await ledger.batches_of("acme") == {"batch-old"}
            assert await ledger.add_file(owned("file-o", "acme", "batch_output", "batch-old")) is True
            assert await ledger.file_owner("file-o") == "acme"
        finally:
            await ledger.close()
