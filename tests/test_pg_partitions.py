"""PostgreSQL monthly partitions (migration 0006, proxy/ledger/pg_partitions.py) against the real
PostgreSQL on 127.0.0.1:5432, one fresh database per test.

A populated ledger converted in place (its `db export` byte for byte, rollups, accounts and meta
equal), replicas starting together, rows on both sides of a month's end and in a month without a
partition, one row per request id across months (writer, two transactions, import), `db prune` by
partition (reports unchanged, rows gone, an interrupted prune finished, a writer running beside
it), queries naming a period reading one partition, and a database user that does not own
`requests`.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import random
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.core.budgets import Periods
from proxy.core.report import GROUPINGS, report_keep
from proxy.core.retention import PruneResult
from proxy.core.rollups import ROLLUP_KEY, Rollup, RollupFilter, rollup_rows
from proxy.ledger import COLUMNS, IN_FLIGHT, TERMINAL_STATUSES, LedgerRow, now_us, period_of, pg_partitions
from proxy.ledger.migrate import MIGRATIONS_DIR, available, migrate
from proxy.ledger.pg_sql import TYPES, row_columns
from proxy.ledger.pg_store import PostgresStore
from proxy.ledger.postgres import _FINISH_IDX, PostgresLedger, _update
from tests.test_cli import run_cli
from tests.test_import import _config, _export, _import
from tests.test_ledger_postgres import _pg_config, opened, until

UTC = Periods()
DAY_US = 86_400_000_000
COLS = ", ".join(COLUMNS)
KEY = ", ".join(ROLLUP_KEY)
PRE_0006 = [m for m in available() if m.version < 6]


def month_start(year: int, month: int) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1_000_000


def partition_of(period: str) -> str:
    return "requests_" + period.replace("-", "_")


def sample_rows(
    n: int, months: tuple[tuple[int, int], ...] = ((2026, 1), (2026, 2), (2026, 3))
) -> list[LedgerRow]:
    """`n` rows over `months`: every status (in flight too), NULLs, the largest BIGINT, a U+FFFD."""
    rnd = random.Random(6)
    out = []
    for i in range(n):
        ts = month_start(*months[i % len(months)]) + rnd.randrange(27 * DAY_US)
        status = (*TERMINAL_STATUSES, IN_FLIGHT)[i % 9]
        terminal = status != IN_FLIGHT
        usage = terminal and i % 5 != 0
        cost = None if not terminal or i % 11 == 0 else (2**63 - 1 if i == 3 else rnd.randrange(10**13))
        out.append(
            LedgerRow(f"req_{ts:013x}{i:012x}", ("acme", "globex")[i % 2], "k1",
                      ("m/a", "m/\ufffdb")[i % 3 == 0], ("chat", "embeddings")[i % 4 == 0],
                      ("serverless", "batch")[i % 7 == 0], ("search", None)[i % 3 == 0],
                      ("prod", None)[i % 4 == 0], bool(i % 2), ts, period_of(ts),
                      status, ts + 1000 if terminal else None, 200 if usage else None,
                      rnd.randrange(10**6) if usage else None, rnd.randrange(10**5) if usage else None,
                      i if usage and i % 2 else None, 1 if usage and i % 3 else None,
                      "upstream" if usage else ("estimated" if terminal else "none"), cost,
                      None if i % 13 == 0 else 6_000_000_000, terminal and i % 2 == 0,
                      "upstream_500" if status == "upstream_error" else None, f"up-{i}" if usage else None)
        )  # fmt: skip
    return out


def in_flight(r: LedgerRow, **fields: Any) -> LedgerRow:
    """`r` as `begin` writes it: in flight, nothing known of its outcome."""
    return dataclasses.replace(r, status=IN_FLIGHT, finished_us=None, upstream_status=None,
                               prompt_tokens=None, completion_tokens=None, usage_source="none",
                               cost_pusd=None, **fields)  # fmt: skip


def terminal_row(request_id: str, ts: int, cost: int = 1_000, **fields: Any) -> LedgerRow:
    """A row recorded terminal at once (as a Batch job's output line is)."""
    return LedgerRow(request_id, "acme", "k1", "m/a", "chat", "batch", "search", None, False, ts,
                     period_of(ts), "ok", ts + 5, 200, 30, 10, usage_source="upstream", cost_pusd=cost,
                     **fields)  # fmt: skip


async def insert(conn: asyncpg.Connection, rows: list[LedgerRow]) -> None:
    """Rows as an earlier version wrote them (owner: a replica long gone, for the in-flight ones),
    in the columns of version 2 (the unit columns came with 0004: every such row is a token row)."""
    early = COLUMNS[: COLUMNS.index("unit")]
    assert all(r.unit == "token" and r.quantity_micros is None for r in rows)
    marks = ", ".join(f"${i + 1}" for i in range(len(early) + 1))
    await conn.executemany(
        f"INSERT INTO requests ({', '.join(early)}, owner) VALUES ({marks})",
        [(*r.values()[: len(early)], "gone-1" if r.status == IN_FLIGHT else None) for r in rows],
    )


async def pre_0006(dsn: str, tmp_path: Path, rows: list[LedgerRow]) -> None:
    """A ledger as the versions before 0006 left it: `rows`, their rollups (made by 0003 from the
    rows), budget accounts and a month pruned before."""
    for name, keep in (("early", lambda v: v <= 2), ("later", lambda v: v < 6)):
        (tmp_path / name).mkdir()
        for m in available():
            if keep(m.version):
                shutil.copy(MIGRATIONS_DIR / f"{m.label}.sql", tmp_path / name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, tmp_path / "early")
        await insert(conn, rows)
        await migrate(conn, tmp_path / "later")
        await conn.execute(
            "INSERT INTO accounts VALUES ('acme', '', '2026-01', 123456789012345678901234567890, 7), "
            "('globex', 'search', '2026-02', 5, 0); INSERT INTO meta VALUES ('pruned:2025-12', '1')"
        )
    finally:
        await conn.close()
    assert await current(dsn, "SELECT MAX(version) FROM schema_migrations") == PRE_0006[-1].version


async def current(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def snapshot(dsn: str) -> dict[str, Any]:
    """Everything 0006 must leave as it was: rollups, accounts, meta, the indexes of `requests`."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "rollups": [tuple(r) for r in await conn.fetch(f"SELECT * FROM rollups ORDER BY {KEY}")],
            "accounts": [tuple(r) for r in await conn.fetch("SELECT * FROM accounts ORDER BY 1, 2, 3")],
            "meta": [tuple(r) for r in await conn.fetch("SELECT * FROM meta ORDER BY 1")],
            "indexes": sorted(
                (r[0], r[1].replace(" ON ONLY ", " ON "))
                for r in await conn.fetch(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'requests' "
                    "AND indexname <> 'requests_pkey'"
                )
            ),
        }  # fmt: skip
    finally:
        await conn.close()


async def placement(dsn: str) -> dict[str, set[str]]:
    """partition -> the periods of the rows it holds."""
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch("SELECT DISTINCT tableoid::regclass::text, period FROM requests")
    finally:
        await conn.close()
    out: dict[str, set[str]] = {}
    for table, period in found:
        out.setdefault(table, set()).add(period)
    return out


async def views(ledger: PostgresStore, months: list[str]) -> dict[str, list[Rollup]]:
    """Every report grouping of every month (tenant-wide and for one tenant), from the rollups."""
    out = {}
    for month in months:
        for by in GROUPINGS:
            for tenant in (None, "acme"):
                out[f"{month}/{by}/{tenant}"] = await ledger.rollups(
                    report_keep(by), RollupFilter(periods=(month,), tenant=tenant)
                )
    return out


# -- migration 0006 -------------------------------------------------------------------------------


async def test_migration_converts_a_populated_ledger_in_place(pg_dsn: str, tmp_path: Path) -> None:
    """0006 on a populated ledger: `db export` byte for byte, rollups, accounts, meta and indexes
    equal, key (request_id, period), one partition per month holding exactly its rows (and the
    current and next month's); then the reaper, the writer and re-records work on it."""
    rows = sample_rows(900)
    await pre_0006(pg_dsn, tmp_path, rows)
    config, env = str(_pg_config(tmp_path)), {"TM_TEST_LEDGER_DSN": pg_dsn}
    before = await snapshot(pg_dsn)
    code, _, err = await run_cli(
        "db", "export", "--config", config, "-o", str(tmp_path / "before.jsonl"), env=env
    )
    assert code == 0, err
    code, out, err = await run_cli("db", "migrate", "--config", config, env=env)
    assert code == 0, err
    assert out.splitlines()[0] == "applied 0006_monthly_partitions"
    code, _, err = await run_cli(
        "db", "export", "--config", config, "-o", str(tmp_path / "after.jsonl"), env=env
    )
    assert code == 0, err
    exported = (tmp_path / "before.jsonl").read_bytes()
    assert exported.count(b"\n") == len(rows) and (tmp_path / "after.jsonl").read_bytes() == exported
    assert await snapshot(pg_dsn) == before
    assert (
        await current(
            pg_dsn, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'requests_pkey'"
        )
        == "PRIMARY KEY (request_id, period)"
    )
    months = {r.period for r in rows}
    assert await placement(pg_dsn) == {partition_of(p): {p} for p in months}
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert set(await pg_partitions.attached(conn)) == months | set(pg_partitions.ahead(UTC, now_us()))
        assert await conn.fetchval("SELECT COUNT(*) FROM requests") == len(rows)
    finally:
        await conn.close()
    async with opened(pg_dsn) as ledger:  # its reaper takes the in-flight rows of the gone replica
        in_flight = [r for r in rows if r.status == IN_FLIGHT]
        assert ledger.orphans_reaped == len(in_flight) > 0
        stored = {r.request_id: r for r in await ledger.rows()}
        assert {stored[r.request_id].status for r in in_flight} == {"orphaned"}
        total = await ledger.rollups(("period",), RollupFilter())
        assert sum(r.requests for r in total) == len(rows)  # the reaped rows joined their lines
        done = rows[0]
        assert done.status != IN_FLIGHT and await ledger.record(done) is False
        moved = dataclasses.replace(done, started_us=done.started_us + 40 * DAY_US)
        moved = dataclasses.replace(moved, period=period_of(moved.started_us))
        assert moved.period != done.period and await ledger.record(moved) is False  # another month
        assert len(await ledger.rows()) == len(rows)


async def test_owner_and_privileges_survive_and_a_user_without_ownership_still_works(
    pg_dsn: str, tmp_path: Path
) -> None:
    """0006 run by a superuser on a ledger another user owns and a third may write: owner and
    grants kept. The writing user (not the owner) gets a month's partition made through the
    owner's requests_partition(); its prune deletes rows (it may not detach), the owner's drops
    the emptied partitions."""
    owner, app = f"tm_owner_{secrets.token_hex(4)}", f"tm_app_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        for role in (owner, app):
            await conn.execute(f"CREATE ROLE {role} LOGIN")
        await conn.execute(f"GRANT CREATE ON SCHEMA public TO {owner}, {app}")
    finally:
        await conn.close()
    as_owner, as_app = (pg_dsn.replace("postgres@", f"{role}@") for role in (owner, app))
    try:
        rows = [terminal_row(f"r{i}", month_start(2026, 1 + i % 2) + i * 1000) for i in range(40)]
        await pre_0006(as_owner, tmp_path, rows)
        conn = await asyncpg.connect(as_owner)
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}")
        await conn.close()
        store = PostgresStore(pg_dsn)  # the superuser
        try:
            assert (await store.migrate())[0][0] == "0006_monthly_partitions"
        finally:
            await store.close()
        assert await current(pg_dsn, "SELECT tableowner FROM pg_tables WHERE tablename = 'requests'") == owner
        assert await current(
            pg_dsn, "SELECT has_table_privilege($1, 'requests', 'SELECT, INSERT, UPDATE, DELETE')", app
        )
        async with opened(as_app) as ledger:
            late = terminal_row("far", month_start(2031, 5))
            assert await ledger.record(late) is True  # 2031-05 had no partition
            made_by = "SELECT tableowner FROM pg_tables WHERE tablename = $1"
            assert await current(pg_dsn, made_by, partition_of("2031-05")) == owner
            assert await ledger.prune("2026-03") == PruneResult(40, ("2026-01", "2026-02"))
            assert [r.request_id for r in await ledger.rows()] == ["far"]
        conn = await asyncpg.connect(as_owner)
        try:
            assert {"2026-01", "2026-02"} <= set(await pg_partitions.attached(conn))  # emptied, not dropped
            assert await pg_partitions.prune(conn, "2026-03", 1000) == PruneResult(0, ())
            assert not {"2026-01", "2026-02"} & set(await pg_partitions.attached(conn))
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(pg_dsn)
        try:
            for role in (owner, app):
                await conn.execute(f"REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role}")
        finally:
            await conn.close()
        admin = await asyncpg.connect(pg_dsn.rsplit("/", 1)[0] + "/postgres")
        try:
            await admin.execute(f'DROP DATABASE "{pg_dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
            for role in (owner, app):
                await admin.execute(f"DROP ROLE {role}")
        finally:
            await admin.close()


async def test_replicas_starting_together_convert_once_and_make_each_partition_once(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Five ledgers opening a pre-0006 ledger at once: one applies 0006, all start, no row lost;
    eight connections making the same new months at once: each is made exactly once."""
    rows = sample_rows(300)
    await pre_0006(pg_dsn, tmp_path, rows)
    ledgers = [PostgresLedger(pg_dsn) for _ in range(5)]
    try:
        await asyncio.gather(*(ledger.open() for ledger in ledgers))
        later = len([m for m in available() if m.version >= 6])  # 0006 and whatever came after it
        assert sorted(len(ledger.migrations_applied) for ledger in ledgers) == [0, 0, 0, 0, later]
        assert len(await ledgers[0].rows()) == len(rows)
    finally:
        for ledger in ledgers:
            await ledger.close()
    conns = [await asyncpg.connect(pg_dsn) for _ in range(8)]
    try:
        made = await asyncio.gather(*(pg_partitions.ensure(c, ["2031-01", "2031-02"]) for c in conns))
        assert sorted(p for m in made for p in m) == ["2031-01", "2031-02"]
        with pytest.raises(asyncpg.InvalidParameterValueError, match="not a period"):
            await pg_partitions.ensure(conns[0], ["2031-13"])
    finally:
        for c in conns:
            await c.close()


# -- writes -----------------------------------------------------------------------------------------


async def test_writes_across_a_month_boundary_land_in_their_months(pg_dsn: str) -> None:
    """Begins on both sides of midnight at the end of this month and of a month years ahead (no
    partition yet: the writer makes it and writes again), in one batch, then finished and
    recorded: each row in its month's partition; accounts and rollups per month equal the rows;
    the heartbeat makes the months ahead again when one is missing."""
    now = pg_partitions.ahead(UTC, now_us())
    edges = [int(UTC.bounds(now[0])[1] * 1_000_000), month_start(2031, 4)]
    async with opened(pg_dsn, lease_seconds=0.6) as ledger:
        begun = []
        for e, edge in enumerate(edges):
            for i, ts in enumerate((edge - 2, edge - 1, edge, edge + 1)):
                begun.append(in_flight(terminal_row(f"b{e}{i}", ts), reserved_pusd=2_000))
        assert await asyncio.gather(*(ledger.begin(r) for r in begun)) == [None] * len(begun)
        assert await ledger.writable()
        finished = [r.terminal("ok", upstream_status=200, prompt_tokens=3, completion_tokens=4,
                               usage_source="upstream", cost_pusd=500 + i)
                    for i, r in enumerate(begun)]  # fmt: skip
        assert await asyncio.gather(*(ledger.finish(r) for r in finished)) == [True] * len(begun)
        recorded = [terminal_row(f"x{i}", edge + i - 1) for i, edge in enumerate(edges * 2)]
        assert await asyncio.gather(*(ledger.record(r) for r in recorded)) == [True] * len(recorded)
        rows = await ledger.rows()
        periods = {r.period for r in rows}
        assert len(periods) == 4 and periods >= set(now)
        assert await placement(pg_dsn) == {partition_of(p): {p} for p in periods}
        assert await ledger.rollups(ROLLUP_KEY, RollupFilter()) == rollup_rows(rows, UTC)
        for period in periods:
            spent = sum(r.cost_pusd or 0 for r in rows if r.period == period)
            assert (await ledger.accounts(period))[("acme", None)] == (spent, 0)
        conn = await asyncpg.connect(pg_dsn)
        try:
            name = partition_of(now[1])
            await conn.execute(f"DELETE FROM requests WHERE period = '{now[1]}'")
            await conn.execute(f"ALTER TABLE requests DETACH PARTITION {name}; DROP TABLE {name}")
            ledger.ahead = None  # as when the month changes
            await until(lambda: _has(conn, now[1]))
        finally:
            await conn.close()


async def _has(conn: asyncpg.Connection, period: str) -> bool:
    return period in await pg_partitions.attached(conn)


async def test_one_request_id_never_lands_in_two_months(pg_dsn: str, tmp_path: Path) -> None:
    """A Batch output line recorded again a month later (another replica, a retry after a crash)
    adds nothing, alone or in one batch with the first; two transactions inserting one id under
    two months: the second waits for the first and inserts nothing (or inserts, if the first
    rolls back); an import bringing an id under another month stops and names the column."""
    march, april = month_start(2026, 3) + 5, month_start(2026, 4) + 5
    async with opened(pg_dsn) as ledger:
        first = terminal_row("batch_b1_0", march - 10)
        assert await ledger.record(first) is True
        assert await ledger.record(terminal_row("batch_b1_0", april, cost=7)) is False
        assert await ledger.accounts("2026-04") == {}  # nothing counted for the second
        pair = (terminal_row("batch_b1_1", march), terminal_row("batch_b1_1", april, cost=7))
        made = await asyncio.gather(*(ledger.record(r) for r in pair))
        assert sorted(made) == [False, True]  # in one batch: one of them, whichever came first
        rows = await ledger.rows()
        assert [r.request_id for r in rows] == ["batch_b1_0", "batch_b1_1"] and rows[0] == first
        assert rows[1] in pair
        assert await ledger.rollups(ROLLUP_KEY, RollupFilter()) == rollup_rows(rows, UTC)
        for month in ("2026-03", "2026-04"):
            spent = sum(r.cost_pusd or 0 for r in rows if r.period == month)
            assert (await ledger.accounts(month)).get(("acme", None), (0, 0)) == (spent, 0)
    a, b = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        marks = ", ".join(f"${i + 1}" for i in range(len(COLUMNS)))
        sql = f"INSERT INTO requests ({COLS}) VALUES ({marks}) ON CONFLICT DO NOTHING"
        for commit in (True, False):
            rid = f"batch_t{int(commit)}_0"
            ta = a.transaction()
            await ta.start()
            assert await a.execute(sql, *terminal_row(rid, march).values()) == "INSERT 0 1"

            async def second(rid: str = rid) -> str:
                async with b.transaction():
                    return str(await b.execute(sql, *terminal_row(rid, april).values()))

            task = asyncio.create_task(second())
            await asyncio.sleep(0.5)
            assert not task.done()  # it waits for the first transaction's lock on this id
            await (ta.commit() if commit else ta.rollback())
            assert await asyncio.wait_for(task, 10) == ("INSERT 0 0" if commit else "INSERT 0 1")
            found = await a.fetch("SELECT period FROM requests WHERE request_id = $1", rid)
            assert [r[0] for r in found] == ["2026-03" if commit else "2026-04"]
    finally:
        await a.close()
        await b.close()
    cfg = _config(tmp_path, {"backend": "postgres", "dsn": pg_dsn})
    other = dataclasses.replace(first, started_us=april, period="2026-04", finished_us=april + 5)
    _export(tmp_path / "c.jsonl", [terminal_row("fresh", april), other])
    assert await _import(cfg, None, tmp_path / "c.jsonl") == 1
    assert len(await current(pg_dsn, "SELECT array_agg(request_id) FROM requests")) == 4  # nothing imported


async def test_import_makes_the_months_partitions_and_stays_idempotent(pg_dsn: str, tmp_path: Path) -> None:
    """A file of three past months into a fresh ledger: their partitions are made (on the side,
    committed) and hold their rows; importing it again adds nothing."""
    rows = [r for r in sample_rows(300, ((2025, 10), (2025, 11), (2026, 2))) if r.status != IN_FLIGHT]
    cfg = _config(tmp_path, {"backend": "postgres", "dsn": pg_dsn})
    _export(tmp_path / "a.jsonl", rows)
    for _ in range(2):
        assert await _import(cfg, None, tmp_path / "a.jsonl") == 0
    assert await placement(pg_dsn) == {partition_of(p): {p} for p in ("2025-10", "2025-11", "2026-02")}
    store = PostgresStore(pg_dsn)
    try:
        assert await store.rows() == sorted(rows, key=lambda r: (r.started_us, r.request_id))
        assert await store.rollups(ROLLUP_KEY, RollupFilter()) == rollup_rows(rows, UTC)
    finally:
        await store.close()


# -- db prune -----------------------------------------------------------------------------------------


async def test_prune_drops_whole_months_and_reports_stay(pg_dsn: str, tmp_path: Path) -> None:
    """Pruning before 2026-04: January's and March's partitions are dropped, February's (a row in
    flight) keeps that row and loses the others; every report of every month is unchanged, the
    count is exact, the months are marked; again: nothing; re-importing the export skips them."""
    rows = [
        r for r in sample_rows(800, ((2026, 1), (2026, 2), (2026, 3), (2026, 4))) if r.status != IN_FLIGHT
    ]
    months = ["2026-01", "2026-02", "2026-03", "2026-04"]
    async with opened(pg_dsn) as ledger:
        assert all(await asyncio.gather(*(ledger.record(r) for r in rows)))
        flying = in_flight(terminal_row("fly", month_start(2026, 2) + 9))
        await ledger.begin(flying)
        reports = await views(ledger, months)
        _export(tmp_path / "all.jsonl", rows)
        gone = [r for r in rows if r.period < "2026-04"]
        assert await ledger.prune("2026-04") == PruneResult(len(gone), ("2026-01", "2026-02", "2026-03"))
        assert await views(ledger, months) == reports
        left = await ledger.rows()
        assert {r.request_id for r in left} == {r.request_id for r in rows if r.period == "2026-04"} | {"fly"}
        assert await placement(pg_dsn) == {
            partition_of("2026-02"): {"2026-02"},
            partition_of("2026-04"): {"2026-04"},
        }
        for month, exists in (("2026-01", False), ("2026-02", True), ("2026-03", False)):
            assert (
                await current(pg_dsn, f"SELECT to_regclass('{partition_of(month)}')") is not None
            ) is exists
        marks = await current(
            pg_dsn, "SELECT array_agg(key ORDER BY key) FROM meta WHERE key LIKE 'pruned:%'"
        )
        assert marks == ["pruned:2026-01", "pruned:2026-02", "pruned:2026-03"]
        assert await ledger.prune("2026-04") == PruneResult(0, ())
    cfg = _config(tmp_path, {"backend": "postgres", "dsn": pg_dsn})
    assert await _import(cfg, None, tmp_path / "all.jsonl") == 0
    assert await current(pg_dsn, "SELECT COUNT(*) FROM requests") == len(left)


async def test_an_interrupted_prune_is_finished_by_the_next(pg_dsn: str) -> None:
    """A DETACH ... CONCURRENTLY cut short (left pending) and a partition detached but not dropped:
    the next prune finishes and drops both, counting their rows once; a table that only looks
    like a partition is left alone."""
    rows = [terminal_row(f"r{i}", month_start(2026, 1 + i % 3) + i) for i in range(90)]
    async with opened(pg_dsn) as ledger:
        assert all(await asyncio.gather(*(ledger.record(r) for r in rows)))
        reports = await views(ledger, ["2026-01", "2026-02", "2026-03"])
    reader, conn = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO meta VALUES ('pruned:2026-01', '1'), ('pruned:2026-02', '1')")
        holding = reader.transaction(isolation="repeatable_read")
        await holding.start()
        await reader.fetchval("SELECT COUNT(*) FROM requests")  # a snapshot the detach must wait for
        await conn.execute("SET statement_timeout = 500")
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute("ALTER TABLE requests DETACH PARTITION requests_2026_01 CONCURRENTLY")
        await holding.rollback()
        await conn.execute("RESET statement_timeout")
        pending = await conn.fetch("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhdetachpending")
        assert [r[0] for r in pending] == ["requests_2026_01"]
        await conn.execute("ALTER TABLE requests DETACH PARTITION requests_2026_02")  # then a crash
        await conn.execute("CREATE TABLE requests_2025_06 (LIKE requests); INSERT INTO requests_2025_06 "
                           "SELECT * FROM requests LIMIT 1")  # fmt: skip
    finally:
        await reader.close()
        await conn.close()
    store = PostgresStore(pg_dsn)
    try:
        assert await store.prune("2026-03") == PruneResult(60, ("2026-01", "2026-02"))
        assert await views(store, ["2026-01", "2026-02", "2026-03"]) == reports
        assert {r.request_id for r in await store.rows()} == {
            r.request_id for r in rows if r.period == "2026-03"
        }
    finally:
        await store.close()
    assert await current(pg_dsn, "SELECT to_regclass('requests_2025_06')") is not None


async def test_prune_beside_a_running_writer(pg_dsn: str) -> None:
    """A writer beginning and finishing rows of this month while a past month is detached and
    dropped: every write commits, none waits long."""
    async with opened(pg_dsn) as ledger:
        old = [terminal_row(f"o{i}", month_start(2026, 1) + i) for i in range(3000)]
        for i in range(0, len(old), 500):
            assert all(await asyncio.gather(*(ledger.record(r) for r in old[i : i + 500])))
        done = asyncio.Event()
        waits: list[float] = []

        async def write() -> None:
            for i in range(100_000):
                if done.is_set() and i > 20:
                    return
                t0 = time.perf_counter()
                r = in_flight(terminal_row(f"w{i}", now_us()))
                await ledger.begin(r)
                assert await ledger.finish(r.terminal("ok", cost_pusd=1)) is True
                waits.append(time.perf_counter() - t0)

        writer = asyncio.create_task(write())
        try:
            await asyncio.sleep(0.2)
            assert await ledger.prune("2026-02") == PruneResult(len(old), ("2026-01",))
        finally:
            done.set()
            await asyncio.wait_for(writer, 30)
        assert len(waits) > 20 and max(waits) < 2.0
        assert len(await ledger.rows()) == len(waits)


# -- queries that name a period ---------------------------------------------------------------------


async def test_queries_naming_a_period_read_one_partition(pg_dsn: str) -> None:
    """With the generic plans the writer uses: a month's rows, and a finish (its UPDATE names the
    month of its rows), scan only that month's partition of the six, the others pruned before the
    statement runs."""
    async with opened(pg_dsn) as ledger:
        rows = [terminal_row(f"r{i}", month_start(2026, 1 + i % 4) + i) for i in range(40)]
        assert all(await asyncio.gather(*(ledger.record(r) for r in rows)))
        flying = in_flight(dataclasses.replace(rows[1], request_id="fly"))
        await ledger.begin(flying)
    conn = await asyncpg.connect(pg_dsn, server_settings={"plan_cache_mode": "force_generic_plan"})
    try:
        explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
        order = "ORDER BY started_us, request_id"
        await conn.execute(f"PREPARE month(text) AS SELECT {COLS} FROM requests WHERE period = $1 {order}")
        plan = await conn.fetch(f"{explain}EXECUTE month('2026-02')")
        scanned = {
            w for (line,) in plan for w in line.replace("(", " ").split() if w.startswith("requests_2")
        }
        assert scanned and {w[: len("requests_2026_02")] for w in scanned} == {"requests_2026_02"}, plan
        assert any("Subplans Removed" in line for (line,) in plan)
        final = flying.terminal("ok", cost_pusd=1)
        await conn.execute(f"PREPARE finish AS {_update(1, True)}")
        arrays = zip((TYPES[j] for j in _FINISH_IDX), row_columns([final], only=_FINISH_IDX), strict=True)
        args = [
            await conn.fetchval(f"SELECT quote_nullable($1::{t}[]::text) || '::{t}[]'", values)
            for t, values in arrays
        ]
        trial = conn.transaction()
        await trial.start()  # EXPLAIN ANALYZE runs the update: rolled back after
        try:
            plan = await conn.fetch(f"{explain}EXECUTE finish({', '.join(args)}, '{final.period}')")
        finally:
            await trial.rollback()
        scans = [line for (line,) in plan if "Scan" in line and "requests_20" in line]
        assert len(scans) == 1 and "requests_2026_02" in scans[0] and "actual rows=1" in scans[0], plan
        assert any("Subplans Removed" in line for (line,) in plan), plan
    finally:
        await conn.close()
