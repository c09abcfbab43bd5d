"""Rollups (proxy/core/rollups.py, kept by both ledgers): always the exact GROUP BY of the terminal rows.

The property: after any sequence of begins, finishes, records (some of them in one group commit,
some repeated) and crashes followed by the reaper, the ledger's rollups equal the rollups
computed from its rows, on SQLite and on PostgreSQL, in a time zone with DST.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.budgets import Periods
from proxy.core.records import TERMINAL_STATUSES
from proxy.core.rollups import (
    ROLLUP_KEY,
    DayCutter,
    RollupFilter,
    collapse,
    day_of,
    day_start_us,
    rollup_rows,
)
from proxy.ledger import COLUMNS, LedgerRow, LedgerUnavailable
from proxy.ledger.migrate import MIGRATIONS_DIR, available, migrate
from proxy.ledger.postgres import PostgresLedger
from proxy.ledger.sqlite import SQLiteLedger

BERLIN = Periods("Europe/Berlin")
# 2026-03-28 .. 2026-04-01 in Berlin: a DST change (03-29), two midnights a day apart, a month end
START = calendar.timegm((2026, 3, 27, 22, 0, 0)) * 1_000_000
SPAN = 5 * 86_400_000_000
KEEPS = (ROLLUP_KEY, ("period", "tenant", "status"), ("day", "model"), ("feature", "environment"))

Op = tuple[Any, ...]


@st.composite
def scripts(draw: st.DrawFn) -> tuple[list[LedgerRow], list[list[Op]]]:
    """Row templates and the ops on them, in groups (the ops of a group go into one commit)."""
    n = draw(st.integers(1, 10))
    templates = [draw(_templates(i)) for i in range(n)]
    outcome = st.tuples(
        st.sampled_from(TERMINAL_STATUSES),
        st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))),
        st.sampled_from(["upstream", "estimated", "none"]),
        st.one_of(st.none(), st.integers(0, 10**15)),
    )
    op = st.one_of(
        st.tuples(st.just("begin"), st.integers(0, n - 1)),
        st.tuples(st.just("finish"), st.integers(0, n - 1), outcome),
        st.tuples(st.just("record"), st.integers(0, n - 1), outcome),
    )
    groups = draw(
        st.lists(st.one_of(st.lists(op, min_size=1, max_size=4), st.just([("restart",)])), max_size=8)
    )
    return templates, groups


def _templates(i: int) -> st.SearchStrategy[LedgerRow]:
    def build(
        offset: int, tenant: str, model: str, feature: str | None, env: str | None, mode: str
    ) -> LedgerRow:
        started = START + offset
        return LedgerRow(f"req_{i:03d}", tenant, "k", model, "chat", mode, feature, env, False, started,
                         BERLIN.of(started), reserved_pusd=1000 + i)  # fmt: skip

    return st.builds(
        build,
        st.integers(0, SPAN),
        st.sampled_from(["acme", "globex"]),
        st.sampled_from(["m/a", "m/b", ""]),
        st.sampled_from([None, "chat", "search"]),
        st.sampled_from([None, "prod"]),
        st.sampled_from(["serverless", "batch"]),
    )


def _terminal(row: LedgerRow, outcome: tuple[Any, ...]) -> LedgerRow:
    status, tokens, source, cost = outcome
    if tokens is None and cost is not None and cost % 3:  # a row priced per unit (images, audio)
        unit = ("megapixel", "audio_second")[cost % 3 - 1]
        return row.terminal(status, usage_source=source, cost_pusd=cost, unit=unit, quantity_micros=cost // 7)
    return row.terminal(
        status,
        prompt_tokens=None if tokens is None else tokens[0],
        completion_tokens=None if tokens is None else tokens[1],
        cached_tokens=None if tokens is None else tokens[0] // 2,
        usage_source=source,
        cost_pusd=cost,
    )


async def _apply(ledger: Any, templates: list[LedgerRow], op: Op) -> None:
    row = templates[op[1]]
    with contextlib.suppress(LedgerUnavailable):  # a begin of an id that exists is refused
        if op[0] == "begin":
            await ledger.begin(row)
        elif op[0] == "finish":
            await ledger.finish(_terminal(row, op[2]))
        else:
            await ledger.record(_terminal(row, op[2]))


async def _run(open_ledger: Any, script: tuple[list[LedgerRow], list[list[Op]]]) -> Any:
    """Play the script; a restart closes the ledger and opens it again (the reaper runs)."""
    templates, groups = script
    ledger = await open_ledger()
    for group in [*groups, [("restart",)]]:
        if group[0][0] == "restart":
            await ledger.close()
            ledger = await open_ledger()
            continue
        await asyncio.gather(*(_apply(ledger, templates, op) for op in group))
    return ledger


async def _check(ledger: Any) -> None:
    rows = await ledger.rows()
    assert not [r for r in rows if r.status == "in_flight"]  # the last restart reaped them
    for keep in KEEPS:
        expected = collapse(rollup_rows(rows, BERLIN), keep)
        assert await ledger.rollups(keep, RollupFilter()) == expected, keep


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=scripts())
def test_sqlite_rollups_equal_the_rows_after_any_ops(
    tmp_path_factory: pytest.TempPathFactory, script: tuple[list[LedgerRow], list[list[Op]]]
) -> None:
    """SQLite: rollups == GROUP BY of the terminal rows after begins, finishes, records, crashes."""
    path = tmp_path_factory.mktemp("rollups") / "l.db"

    async def run() -> None:
        async def reopen() -> SQLiteLedger:
            ledger = SQLiteLedger(path, timezone=BERLIN.timezone)
            await ledger.open()
            return ledger

        ledger = await _run(reopen, script)
        try:
            await _check(ledger)
        finally:
            await ledger.close()

    asyncio.run(run())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=scripts())
def test_postgres_rollups_and_accounts_equal_the_rows_after_any_ops(
    pg_dsn: str, script: tuple[list[LedgerRow], list[list[Op]]]
) -> None:
    """PostgreSQL: rollups == GROUP BY of the terminal rows, accounts == their costs, after any ops."""

    async def run() -> None:
        conn = await asyncpg.connect(pg_dsn)
        with contextlib.suppress(asyncpg.UndefinedTableError):
            await conn.execute("TRUNCATE requests, rollups, accounts, instances")
        await conn.close()

        async def reopen() -> PostgresLedger:
            ledger = PostgresLedger(pg_dsn, timezone=BERLIN.timezone, lease_seconds=30)
            await ledger.open()
            return ledger

        ledger = await _run(reopen, script)
        try:
            await _check(ledger)
            rows = await ledger.rows()
            for period in {r.period for r in rows}:
                spent: dict[tuple[str, str | None], int] = {}
                for r in rows:
                    if r.period == period and r.cost_pusd:
                        for key in {(r.tenant, None), (r.tenant, r.feature)}:
                            spent[key] = spent.get(key, 0) + r.cost_pusd
                got = {k: v[0] for k, v in (await ledger.accounts(period)).items() if v[0]}
                assert got == {k: v for k, v in spent.items() if v}
        finally:
            await ledger.close()

    asyncio.run(run())


def test_days_are_cut_exactly_in_the_zone_around_midnight_and_dst() -> None:
    """A row's day is its local date to the µs; a day starts at local midnight, also across DST."""
    midnight = calendar.timegm((2026, 3, 28, 23, 0, 0)) * 1_000_000  # 2026-03-29 00:00 in Berlin
    assert day_of(midnight - 1, BERLIN) == "2026-03-28"
    assert day_of(midnight, BERLIN) == "2026-03-29"
    assert day_start_us("2026-03-29", BERLIN) == midnight
    assert day_start_us("2026-03-30", BERLIN) == midnight + 23 * 3_600_000_000  # the short day
    cut = DayCutter(BERLIN)
    for ts in (midnight - 1, midnight, midnight + 1, midnight - 1, START, START + SPAN):
        assert cut(ts) == day_of(ts, BERLIN)


async def test_rollups_are_made_from_the_rows_of_an_older_sqlite_file(tmp_path: Path) -> None:
    """A ledger file from before rollups (with `db prune` aggregates) gets them at open, exactly."""
    path = tmp_path / "old.db"
    ledger = SQLiteLedger(path)
    await ledger.open()
    rows = [
        LedgerRow(f"r{i}", "acme", "k", "m", "chat", "serverless", None, None, False,
                  START + i * 3_600_000_000, "2026-03", "ok", START, 200, 10, i, usage_source="upstream",
                  cost_pusd=i)
        for i in range(30)
    ]  # fmt: skip
    for r in rows:
        await ledger.record(r)
    await ledger.close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # as the earlier version left it
        db.executescript(
            "DROP TRIGGER rollup_inserted; DROP TRIGGER rollup_finished; DROP TABLE rollups; "
            "DELETE FROM meta WHERE key LIKE 'rollup%';"
            "CREATE TABLE aggregates (period TEXT, day TEXT, tenant TEXT, model TEXT, endpoint TEXT, "
            "mode TEXT, feature TEXT, environment TEXT, status TEXT, usage_source TEXT, "
            "requests INTEGER, with_usage INTEGER, input_tokens INTEGER, output_tokens INTEGER, "
            "priced INTEGER, cost_pusd INTEGER);"
            "INSERT INTO aggregates VALUES ('2026-02', '2026-02-03', 'acme', 'm', 'chat', 'serverless', "
            "'', '', 'ok', 'upstream', 5, 5, 50, 5, 4, 400);"
        )
    reader = SQLiteLedger(path)
    with pytest.raises(LedgerUnavailable, match="no rollups yet"):
        await reader.rollups(ROLLUP_KEY, RollupFilter())
    ledger = SQLiteLedger(path)
    await ledger.open()
    assert ledger.migrations_applied[0] == "rollups made from the rows: 3 line(s)"  # 3 UTC days
    await ledger.close()
    assert await reader.rollups(ROLLUP_KEY, RollupFilter(periods=("2026-03",))) == rollup_rows(
        rows, Periods()
    )
    (old,) = await reader.rollups(ROLLUP_KEY, RollupFilter(periods=("2026-02",)))
    assert (old.requests, old.priced, old.cost_pusd, old.cost_unknown, old.feature) == (5, 4, 400, 1, None)


async def test_an_sqlite_file_from_before_units_gains_them_in_place(tmp_path: Path) -> None:
    """Schema 1 (no unit columns, rollups without a unit key): the columns are added, every old
    row and rollup line is a token one, a pruned month's lines (no rows) are kept, and unit rows
    written after that roll up by unit."""
    path = tmp_path / "v1.db"
    ledger = SQLiteLedger(path)
    await ledger.open()
    old = [
        LedgerRow(f"r{i}", "acme", "k", "m", "chat", "serverless", None, None, False,
                  START + i * 3_600_000_000, "2026-03", "ok", START, 200, 10, i, usage_source="upstream",
                  cost_pusd=i)
        for i in range(12)
    ]  # fmt: skip
    for r in old:
        await ledger.record(r)
    await ledger.close()
    key_v1 = ", ".join(k for k in ROLLUP_KEY if k != "unit")
    with contextlib.closing(sqlite3.connect(path)) as db:  # as version 1 left it
        db.executescript(
            "DROP TRIGGER rollup_inserted; DROP TRIGGER rollup_finished;"
            "ALTER TABLE requests DROP COLUMN unit; ALTER TABLE requests DROP COLUMN quantity_micros;"
            f"CREATE TABLE r1 AS SELECT {key_v1}, requests, with_usage, input_tokens, output_tokens, "
            "cached_tokens, priced, cost_pusd, estimated, cost_unknown FROM rollups;"
            "DROP TABLE rollups; ALTER TABLE r1 RENAME TO rollups;"
            "INSERT INTO rollups VALUES ('2026-02', '2026-02-03', 'acme', 'm', '', '', 'serverless', "
            "'chat', 'ok', 'upstream', 5, 5, 50, 5, 0, 5, 400, 0, 0);"
            "UPDATE meta SET value = '1' WHERE key IN ('rollups', 'schema_version');"
        )
    ledger = SQLiteLedger(path)
    await ledger.open()
    image = LedgerRow("img", "acme", "k", "flux", "images", "serverless", None, None, False, START, "2026-03",
                      "ok", START, 200, usage_source="derived", cost_pusd=2_831_155_200, unit="megapixel",
                      quantity_micros=1_048_576)  # fmt: skip
    await ledger.record(image)
    rows = await ledger.rows()
    assert rows == sorted([*old, image], key=lambda r: (r.started_us, r.request_id))
    assert await ledger.rollups(ROLLUP_KEY, RollupFilter(periods=("2026-03",))) == rollup_rows(
        rows, Periods()
    )
    (pruned,) = await ledger.rollups(ROLLUP_KEY, RollupFilter(periods=("2026-02",)))
    assert (pruned.unit, pruned.requests, pruned.cost_pusd, pruned.quantity_micros) == ("token", 5, 400, 0)
    (by_unit,) = [r for r in await ledger.rollups(("unit",), RollupFilter()) if r.unit == "megapixel"]
    assert (by_unit.requests, by_unit.quantity_micros) == (1, 1_048_576)
    await ledger.close()


async def test_postgres_migration_fills_rollups_from_rows_and_aggregates(pg_dsn: str, tmp_path: Path) -> None:
    """0003 on a version-2 database: rollups from its terminal rows (days in budgets.timezone) and
    from `db prune`'s aggregates, which it then drops; the pruned months are remembered."""
    for name in ("0001_initial.sql", "0002_owned_files.sql"):
        (tmp_path / name).write_text((MIGRATIONS_DIR / name).read_text())
    rows = [
        LedgerRow(f"r{i}", "acme", "k", "m", "chat", "serverless", ("f", None)[i % 2], None, False,
                  START + i * 3_600_000_000, BERLIN.of(START + i * 3_600_000_000), "ok", START, 200, 10, i,
                  usage_source="upstream", cost_pusd=None if i % 5 == 0 else i)
        for i in range(40)
    ]  # fmt: skip
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, tmp_path)
        before_units = COLUMNS[: COLUMNS.index("unit")]  # the columns of a version-2 database
        cols = ", ".join(before_units)
        marks = ", ".join(f"${i + 1}" for i in range(len(before_units)))
        width = len(before_units)
        await conn.executemany(
            f"INSERT INTO requests ({cols}) VALUES ({marks})", [r.values()[:width] for r in rows]
        )
        in_flight = LedgerRow(
            "fl", "acme", "k", "m", "chat", "serverless", None, None, False, START, "2026-03"
        )
        await conn.execute(f"INSERT INTO requests ({cols}) VALUES ({marks})", *in_flight.values()[:width])
        await conn.execute(
            "INSERT INTO aggregates VALUES ('2026-02', '2026-02-03', 'acme', 'm', 'chat', 'serverless', "
            "'', '', 'ok', 'upstream', 5, 5, 50, 5, 4, 400)"
        )
        applied = [m.label for m in await migrate(conn, timezone=BERLIN.timezone)]
        assert applied == [m.label for m in available() if m.version >= 3]
        meta = dict(await conn.fetch("SELECT key, value FROM meta"))
        assert meta == {"rollup_timezone": "Europe/Berlin", "pruned:2026-02": "1"}
        assert await conn.fetchval("SELECT to_regclass('aggregates')") is None
    finally:
        await conn.close()
    ledger = PostgresLedger(pg_dsn, timezone=BERLIN.timezone)
    try:
        summed = await ledger.rollups(ROLLUP_KEY, RollupFilter(periods=("2026-03", "2026-04")))
        assert summed == rollup_rows(rows, BERLIN)
        (old,) = await ledger.rollups(ROLLUP_KEY, RollupFilter(periods=("2026-02",)))
        assert (old.requests, old.cost_pusd, old.cost_unknown, old.feature) == (5, 400, 1, None)
    finally:
        await ledger.close()
