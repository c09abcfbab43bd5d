"""proxy/ledger/postgres.py against the real PostgreSQL on 127.0.0.1:5432, one fresh database per test.

Idempotency and statuses as in SQLite, group commit with exact per-row results, budgets admitted
atomically in the database across ledger instances, migrations, the reaper's lease, DSN masking,
connection loss through a TCP fault relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from proxy.config import LedgerSettings
from proxy.core.budgets import BudgetExceeded
from proxy.errors import ConfigError
from proxy.ledger import IN_FLIGHT, TERMINAL_STATUSES, LedgerRow, LedgerUnavailable, now_us, period_of
from proxy.ledger.factory import open_ledger, postgres_dsn
from proxy.ledger.migrate import available, migrate
from proxy.ledger.pg_store import mask_dsn
from proxy.ledger.postgres import PostgresLedger, _Op
from tests.faultrelay import FaultRelay
from tests.pg import HOST, PORT
from tests.test_cli import ROOT, run_cli

RESERVED = 6_000_000_000  # $0.006 per request
WAIT_S = 10.0


def row(
    i: int | str, tenant: str = "acme", feature: str | None = "search", reserved: int | None = RESERVED
) -> LedgerRow:
    started = now_us()
    return LedgerRow(
        f"req_{i}",
        tenant,
        "k1",
        "deepseek-ai/DeepSeek-V3",
        "chat",
        "serverless",
        feature,
        "prod",
        False,
        started,
        period_of(started),
        reserved_pusd=reserved,
    )


def ok(r: LedgerRow, cost: int = 4_000_000_000) -> LedgerRow:
    return r.terminal(
        "ok",
        upstream_status=200,
        prompt_tokens=3000,
        completion_tokens=10,
        usage_source="upstream",
        cost_pusd=cost,
    )


@contextlib.asynccontextmanager
async def opened(dsn: str, **kwargs: Any) -> AsyncIterator[PostgresLedger]:
    ledger = PostgresLedger(dsn, **kwargs)
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.close()


async def until(check: Callable[[], Any], within: float = WAIT_S) -> None:
    """Poll `check` (sync or async) until truthy, at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def ledger_sums(ledger: PostgresLedger, period: str) -> dict[tuple[str, str | None], tuple[int, int]]:
    """(tenant, feature) -> (spent, reserved) recomputed from the rows, as the accounts must hold them."""
    sums: dict[tuple[str, str | None], list[int]] = {}
    for r in await ledger.rows(period=period):
        for key in ((r.tenant, None), *(((r.tenant, r.feature),) if r.feature is not None else ())):
            s = sums.setdefault(key, [0, 0])
            if r.status == IN_FLIGHT:
                s[1] += r.reserved_pusd or 0
            else:
                s[0] += r.cost_pusd or 0
    return {k: (v[0], v[1]) for k, v in sums.items()}


# -- rows, statuses, idempotency ------------------------------------------------------------


async def test_rows_round_trip_with_every_terminal_status(pg_dsn: str) -> None:
    """A row read back equals the row written, for every terminal status (recorded or finished)."""
    async with opened(pg_dsn) as ledger:
        written = []
        for i, status in enumerate(TERMINAL_STATUSES):
            r = row(i, feature=None if i % 2 else "search")
            await ledger.begin(r)
            final = r.terminal(status, upstream_status=200, prompt_tokens=5, completion_tokens=7,
                               cached_tokens=2, reasoning_tokens=1, usage_source="upstream",
                               cost_pusd=i * 1000, stream_complete=True, error_code=f"e{i}",
                               upstream_id=f"up-{i}")  # fmt: skip
            assert await ledger.finish(final) is True
            written.append(final)
        rec = row("recorded").terminal("rejected", cost_pusd=0, error_code="invalid_json")
        assert await ledger.record(rec) is True
        written.append(rec)
        assert await ledger.rows() == sorted(written, key=lambda r: (r.started_us, r.request_id))
        assert [r async for r in ledger.iter_rows(page=3)] == await ledger.rows()


async def test_begun_rows_read_back_exactly_in_either_statement(pg_dsn: str) -> None:
    """A batch of fresh begins goes in the lean statement, one holding a begin with values in its
    terminal columns in the full one: either way every column reads back as given, and the
    account moves are the same."""
    async with opened(pg_dsn) as ledger:
        fresh = [row(f"lean{i}", feature=None if i % 2 else "search") for i in range(6)]
        assert await asyncio.gather(*(ledger.begin(r) for r in fresh)) == [None] * 6
        odd = dataclasses.replace(row("odd"), upstream_id="up-odd", error_code="e", usage_source="upstream")
        mixed = [row(f"mix{i}") for i in range(3)] + [odd]
        assert await asyncio.gather(*(ledger.begin(r) for r in mixed)) == [None] * 4
        written = sorted([*fresh, *mixed], key=lambda r: (r.started_us, r.request_id))
        assert await ledger.rows() == written
        accounts = await ledger.accounts(fresh[0].period)
        assert accounts == {("acme", None): (0, 10 * RESERVED), ("acme", "search"): (0, 7 * RESERVED)}
        await asyncio.gather(*(ledger.finish(ok(r, 1_000)) for r in written))
        assert await ledger.accounts(fresh[0].period) == {
            ("acme", None): (10_000, 0),
            ("acme", "search"): (7_000, 0),
        }


async def test_finish_and_record_are_idempotent(pg_dsn: str) -> None:
    """finish makes a row terminal at most once; record inserts or ignores; the first values stay."""
    terminal: list[str] = []
    async with opened(pg_dsn, on_terminal=lambda r: terminal.append(r.request_id)) as ledger:
        r = row(1)
        await ledger.begin(r)
        assert await ledger.finish(ok(r, 1000)) is True
        assert await ledger.finish(ok(r, 2000)) is False
        assert await ledger.finish(r.terminal("client_aborted", cost_pusd=3000)) is False
        rec = row(2).terminal("rejected", cost_pusd=0, error_code="invalid_json")
        assert (await ledger.record(rec), await ledger.record(rec)) == (True, False)
        with pytest.raises(LedgerUnavailable, match="duplicate request id"):
            await ledger.begin(r)
        rows = {x.request_id: x for x in await ledger.rows()}
        assert (rows["req_1"].status, rows["req_1"].cost_pusd) == ("ok", 1000)
        assert len(rows) == 2
        assert terminal == ["req_1", "req_2"]  # counted once each


async def test_group_commit_gives_each_op_its_own_result(pg_dsn: str) -> None:
    """200 concurrent begins and then finishes go in a few transactions; every result is exact."""
    commits: list[tuple[int, bool]] = []
    async with opened(pg_dsn, on_commit=lambda n, _s, good: commits.append((n, good))) as ledger:
        rows = [row(i) for i in range(200)]
        assert await asyncio.gather(*(ledger.begin(r) for r in rows)) == [None] * 200
        twice = [ok(r) for r in rows[:50]] * 2  # the second finish of a row in one batch: False
        made = await asyncio.gather(*(ledger.finish(t) for t in [*twice, *(ok(r) for r in rows[50:])]))
        assert made.count(True) == 200 and made.count(False) == 50
        assert made[:50] == [True] * 50 and made[50:100] == [False] * 50
        assert sum(n for n, good in commits if good) == 450
        assert len(commits) < 50  # grouped: far fewer transactions than ops
        assert {r.status for r in await ledger.rows()} == {"ok"}


async def test_a_value_the_database_refuses_fails_only_its_own_row(pg_dsn: str) -> None:
    """A reservation beyond BIGINT fails its begin alone; a NUL in a model id is stored replaced."""
    async with opened(pg_dsn) as ledger:
        good = [row(i) for i in range(5)]
        bad = row("huge", reserved=2**70)
        nul = LedgerRow(
            **{
                **{f: getattr(good[0], f) for f in good[0].__slots__},
                "request_id": "req_nul",
                "model": "a\x00b",
            }
        )
        results = await asyncio.gather(*(ledger.begin(r) for r in [*good, bad, nul]), return_exceptions=True)
        assert results[:5] == [None] * 5 and results[6] is None
        assert isinstance(results[5], LedgerUnavailable)
        stored = {r.request_id: r for r in await ledger.rows()}
        assert len(stored) == 6 and stored["req_nul"].model == "a\ufffdb"


# -- budgets in the database ----------------------------------------------------------------


async def test_two_ledgers_never_admit_more_than_the_hard_budget(pg_dsn: str) -> None:
    """500 begins at 1 % of a hard budget each, split over two ledgers on one database: exactly 100."""
    limits = {("acme", None): 100 * RESERVED}
    async with (
        opened(pg_dsn, hard_limits=lambda: limits) as a,
        opened(pg_dsn, hard_limits=lambda: limits) as b,
    ):
        rows = [row(i) for i in range(500)]
        results = await asyncio.gather(
            *((a if i % 2 else b).begin(r) for i, r in enumerate(rows)), return_exceptions=True
        )
        assert results.count(None) == 100
        refused = [x for x in results if x is not None]
        assert len(refused) == 400 and all(isinstance(x, BudgetExceeded) for x in refused)
        assert "Monthly budget exceeded for 'acme'" in str(refused[0]) and "remaining $0.000000" in str(
            refused[0]
        )
        period = rows[0].period
        accounts = await a.accounts(period)
        assert accounts[("acme", None)] == (0, 100 * RESERVED)
        assert accounts == await ledger_sums(a, period)
        assert len(await a.rows()) == 100  # a refused begin leaves no row


async def test_finish_settles_the_account_in_the_same_transaction(pg_dsn: str) -> None:
    """Accounts move reserved -> spent as rows end; a feature budget is checked beside the tenant's."""
    limits = {("acme", None): 10 * RESERVED, ("acme", "search"): 2 * RESERVED}
    async with opened(pg_dsn, hard_limits=lambda: limits) as ledger:
        r1, r2, r3 = row(1), row(2), row(3)
        await ledger.begin(r1)
        await ledger.begin(r2)
        with pytest.raises(BudgetExceeded, match="'acme/search'"):
            await ledger.begin(r3)  # the feature budget is full; the tenant's is not
        await ledger.begin(row(4, feature=None))  # tenant-wide only: fits
        assert await ledger.finish(ok(r1, 1_000)) is True
        assert await ledger.finish(r2.terminal("upstream_error", cost_pusd=0)) is True
        await ledger.begin(r3)  # room again: the reservations were settled
        period = r1.period
        accounts = await ledger.accounts(period)
        assert accounts[("acme", "search")] == (1_000, RESERVED)
        assert accounts[("acme", None)] == (1_000, 2 * RESERVED)
        assert accounts == await ledger_sums(ledger, period)


async def test_limits_follow_the_callable(pg_dsn: str) -> None:
    """The hard limits are read at each batch: a budget raised by a reload admits at once."""
    limits = {("acme", None): RESERVED}
    async with opened(pg_dsn, hard_limits=lambda: limits) as ledger:
        await ledger.begin(row(1))
        with pytest.raises(BudgetExceeded):
            await ledger.begin(row(2))
        limits[("acme", None)] = 3 * RESERVED
        await ledger.begin(row(2))
        assert len(await ledger.rows()) == 2


# -- migrations -----------------------------------------------------------------------------


async def test_migrations_apply_once(pg_dsn: str) -> None:
    """The first run applies every migration, the second none; schema_migrations lists each once."""
    labels = [m.label for m in available()]
    assert labels and labels[0] == "0001_initial"
    version = available()[-1].version
    ledger = PostgresLedger(pg_dsn)
    try:
        assert await ledger.migrate() == (labels, version)
        assert await ledger.migrate() == ([], version)
    finally:
        await ledger.close()


async def test_concurrent_migrations_do_not_race(pg_dsn: str) -> None:
    """Five connections migrating at once: one applies, four find nothing to do, no error."""
    conns = [await asyncpg.connect(pg_dsn) for _ in range(5)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(len(a) for a in applied) == [0, 0, 0, 0, len(available())]
        assert await conns[0].fetchval("SELECT COUNT(*) FROM schema_migrations") == len(available())
    finally:
        for c in conns:
            await c.close()


# -- reaper and lease -----------------------------------------------------------------------


async def test_reaper_takes_only_rows_of_replicas_past_their_lease(pg_dsn: str) -> None:
    """Rows of a replica silent past the lease become orphaned at their reservation; a live one's stay."""
    async with opened(pg_dsn, lease_seconds=1) as live, opened(pg_dsn, lease_seconds=1) as other:
        dead = PostgresLedger(pg_dsn, lease_seconds=1)
        await dead.open()
        try:
            await dead.begin(row("dead1"))
            await dead.begin(row("dead2", feature=None, reserved=None))
            await live.begin(row("live"))
            await other.begin(row("other"))
            assert dead._maintenance is not None
            dead._maintenance.cancel()  # as if the process froze: no more heartbeats
            await until(lambda: live.reaped + other.reaped == 2)  # their periodic reapers
            await asyncio.sleep(1.5)  # a few more rounds past the lease
            assert live.reaped + other.reaped == 2 and await other.reap() == 0
            rows = {r.request_id: r for r in await live.rows()}
            assert (rows["req_dead1"].status, rows["req_dead1"].cost_pusd, rows["req_dead1"].error_code) == (
                "orphaned",
                RESERVED,
                "process_died",
            )
            assert (rows["req_dead2"].status, rows["req_dead2"].cost_pusd) == ("orphaned", None)  # unpriced
            assert rows["req_live"].status == IN_FLIGHT and rows["req_other"].status == IN_FLIGHT
            period = rows["req_live"].period
            assert await live.accounts(period) == await ledger_sums(live, period)
            assert (await live.accounts(period))[("acme", None)] == (RESERVED, 2 * RESERVED)
            # its late finish changes nothing: the row was settled at its reservation
            assert await dead.finish(ok(rows["req_dead1"])) is False
        finally:
            await dead.close()


async def test_a_stopped_replica_is_reaped_without_waiting_for_the_lease(pg_dsn: str) -> None:
    """close() marks the instance stopped: a row it could not finish is reaped at once."""
    async with opened(pg_dsn, lease_seconds=300) as other:
        gone = PostgresLedger(pg_dsn, lease_seconds=300)
        await gone.open()
        await gone.begin(row(1))
        await gone.close()
        assert await other.reap() == 1


# -- notifications claimed once across replicas -----------------------------------------------


async def test_a_notification_is_claimed_by_one_replica(pg_dsn: str) -> None:
    """Two replicas claim one threshold: one wins; delivered, it is never claimed again."""
    async with opened(pg_dsn) as a, opened(pg_dsn) as b:
        key = ("acme", None, "2026-11", "0.5")
        assert [await a.claim_notification(*key), await b.claim_notification(*key)] == [True, False]
        assert await a.notifications("2026-11") == [("acme", None, "0.5")]  # being sent: not due again
        await a.release_notification(*key)  # given up
        assert await b.claim_notification(*key) is True
        assert await b.record_notification(*key) is True
        assert await b.record_notification(*key) is False
        assert await a.claim_notification(*key) is False


# -- connection loss ------------------------------------------------------------------------


async def test_outage_refuses_begins_and_commits_finishes_after_recovery(pg_dsn: str) -> None:
    """Cut from the database: begin raises, writable() is False, a finish waits at most
    commit_timeout and still commits (once) when the database is back."""
    database = pg_dsn.rsplit("/", 1)[1]
    terminal: list[str] = []
    async with await FaultRelay.start(HOST, PORT) as relay:
        dsn = f"postgresql://postgres@127.0.0.1:{relay.port}/{database}"
        async with opened(
            dsn, commit_timeout=1.0, on_terminal=lambda r: terminal.append(r.request_id)
        ) as ledger:
            r1 = row(1)
            await ledger.begin(r1)
            relay.refuse()
            relay.drop_all(rst=True)
            t0 = time.monotonic()
            with pytest.raises(LedgerUnavailable):
                await ledger.finish(ok(r1))  # queued; the caller is let go after commit_timeout
            assert time.monotonic() - t0 < 3
            assert await ledger.writable() is False
            with pytest.raises(LedgerUnavailable):
                await ledger.begin(row(2))
            relay.passthrough()
            await until(ledger.writable)
            await until(lambda: terminal == ["req_1"])
            rows = await ledger.rows()
            assert [(r.request_id, r.status) for r in rows] == [("req_1", "ok")]
            await ledger.begin(row(3))
            assert len(await ledger.rows()) == 2


async def test_a_silent_database_times_out_the_begin(pg_dsn: str) -> None:
    """A database that stops answering (no reset, no data) costs a begin at most commit_timeout."""
    database = pg_dsn.rsplit("/", 1)[1]
    async with await FaultRelay.start(HOST, PORT) as relay:
        dsn = f"postgresql://postgres@127.0.0.1:{relay.port}/{database}"
        async with opened(dsn, commit_timeout=0.5) as ledger:
            relay.stall()
            t0 = time.monotonic()
            with pytest.raises(LedgerUnavailable):
                await ledger.begin(row(1))
            assert time.monotonic() - t0 < 3
            assert await ledger.writable() is False
            relay.passthrough()
            await until(ledger.writable)
            await ledger.begin(row(2))
            assert [r.request_id for r in await ledger.rows()] == ["req_2"]


async def test_a_retried_finish_that_had_committed_counts_once(pg_dsn: str) -> None:
    """A retried finish whose earlier attempt committed (reply lost) is recognised: True, no second settle."""
    terminal: list[str] = []
    async with opened(pg_dsn, on_terminal=lambda r: terminal.append(r.request_id)) as ledger:
        r = row(1)
        await ledger.begin(r)
        final = ok(r, 1_000)
        assert await ledger.finish(final) is True  # the attempt that committed
        op = _Op("finish", final, asyncio.get_running_loop().create_future())
        op.retried = True  # ... and its retry after a lost COMMIT reply
        assert await ledger._write([op]) == []
        assert op.fut is not None and op.fut.result() is True
        other = _Op("finish", ok(r, 2_000), None)
        other.retried = True  # a different finish of the same row is not recognised
        await ledger._write([other])
        assert terminal == ["req_1", "req_1"]  # the committed attempt never reported, then the retry
        assert (await ledger.accounts(r.period))[("acme", None)] == (1_000, 0)


# -- DSN handling -----------------------------------------------------------------------------


def test_dsn_passwords_are_masked() -> None:
    """A DSN's password never reaches a log or error: it is replaced by ***."""
    assert mask_dsn("postgresql://meter:s3cr%40t@db:5432/ledger") == "postgresql://meter:***@db:5432/ledger"
    assert mask_dsn("postgres://meter@db/ledger?password=hunter2&sslmode=require") == (
        "postgres://meter@db/ledger?password=***&sslmode=require"
    )
    assert mask_dsn("postgresql://db/ledger") == "postgresql://db/ledger"


async def test_open_errors_do_not_show_the_password() -> None:
    """A ledger that cannot open names the database with its password masked."""
    ledger = PostgresLedger("postgresql://meter:hunter2-canary@127.0.0.1:9/ledger", commit_timeout=2)
    with pytest.raises(LedgerUnavailable) as caught:
        await ledger.open()
    assert "hunter2-canary" not in str(caught.value) and "meter:***@127.0.0.1:9/ledger" in str(caught.value)
    assert "hunter2-canary" not in repr(LedgerSettings(backend="postgres", dsn=ledger._dsn))


def test_dsn_env_is_read_when_the_ledger_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """ledger.dsn_env names a variable read at start; unset, it is a config error naming the key."""
    settings = LedgerSettings(backend="postgres", dsn_env="TM_TEST_DSN")
    monkeypatch.delenv("TM_TEST_DSN", raising=False)
    with pytest.raises(ConfigError, match=r"ledger\.dsn_env: environment variable TM_TEST_DSN is not set"):
        postgres_dsn(settings, "c.yaml")
    monkeypatch.setenv("TM_TEST_DSN", "postgresql://u:pw@127.0.0.1/db")
    ledger = open_ledger(settings)
    assert isinstance(ledger, PostgresLedger) and ledger.where == "postgresql://u:***@127.0.0.1/db"


# -- the commands on PostgreSQL: db migrate, report, db prune, db export ------------------------


def _pg_config(directory: Path) -> Path:
    """config/example.yaml with `ledger: {backend: postgres, dsn_env: TM_TEST_LEDGER_DSN}`."""
    data = yaml.safe_load((ROOT / "config" / "example.yaml").read_text(encoding="utf-8"))
    data["ledger"] = {"backend": "postgres", "dsn_env": "TM_TEST_LEDGER_DSN"}
    data.pop("keys_file", None)
    (directory / "prices.yaml").write_text((ROOT / "config" / "prices.yaml").read_text(encoding="utf-8"))
    path = directory / "pg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def test_commands_read_and_prune_the_postgres_ledger(pg_dsn: str, tmp_path: Path) -> None:
    """db migrate, report, db prune and db export work on PostgreSQL; a pruned month reports the same."""
    config = str(_pg_config(tmp_path))
    env = {"TM_TEST_LEDGER_DSN": pg_dsn.replace("postgres@", "postgres:pw-canary-77@")}
    code, out, err = await run_cli("db", "migrate", "--config", config, env=env)
    assert code == 0 and "pw-canary-77" not in out + err
    version = available()[-1].version
    lines = out.splitlines()
    assert lines[: len(available())] == [f"applied {m.label}" for m in available()]
    assert lines[-1].endswith(f"schema at version {version}")
    code, out, _ = await run_cli("db", "migrate", "--config", config, env=env)
    assert code == 0 and out.strip().endswith(f"schema at version {version} (up to date)") and ":***@" in out
    ledger = PostgresLedger(pg_dsn)
    await ledger.open()
    start = 1767225600 * 1_000_000  # 2026-01-01T00:00:00Z
    try:
        for i in range(40):
            ts = start + i * 86_400_000_000
            r = LedgerRow(f"c{i:02d}", "acme" if i % 3 else "globex", "k", "arcee-ai/maestro-reasoning",
                          "chat", "serverless", "chat" if i % 2 else None, "prod", False, ts, period_of(ts),
                          "ok", ts + 5, 200, 3000, 1000, usage_source="upstream",
                          cost_pusd=6_000_000_000 + i)  # fmt: skip
            assert await ledger.record(r) is True
    finally:
        await ledger.close()
    report = ("report", "--config", config, "--month", "2026-01", "--by", "day", "--format", "json")
    code, before, err = await run_cli(*report, env=env)
    assert code == 0, err
    assert json.loads(before)["total"]["requests"] == 31
    code, out, err = await run_cli("db", "prune", "--config", config, "--before", "2026-02", env=env)
    assert (code, out.strip()) == (
        0,
        "pruned 31 row(s) before 2026-02; their rollups stay, so reports of those months are unchanged; "
        "periods: 2026-01",
    )
    code, after, err = await run_cli(*report, env=env)
    assert code == 0 and json.loads(after) == json.loads(before)
    code, out, err = await run_cli("db", "export", "--config", config, env=env)
    assert code == 0 and [json.loads(line)["request_id"] for line in out.splitlines()] == [
        f"c{i:02d}" for i in range(31, 40)
    ]
    code, _, err = await run_cli("report", "--config", config, "--month", "2026-01", env={})
    assert code == 2 and "ledger.dsn_env: environment variable TM_TEST_LEDGER_DSN is not set" in err
