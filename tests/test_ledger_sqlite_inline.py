"""proxy/ledger/sqlite.py: a write on a quiet ledger commits inline in the caller, under load it
is queued for the writer's group commit; both give the same rows, rollups and errors, in order."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import proxy.ledger.sqlite as sqlite_ledger
from proxy.ledger import IN_FLIGHT, LedgerRow, LedgerUnavailable, now_us, period_of
from proxy.ledger.sqlite import SQLiteLedger


def _row(n: int, model: str = "m/a") -> LedgerRow:
    now = now_us() + n
    return LedgerRow(f"req-{n:03d}", "acme", "k", model, "chat", "serverless", "f", None, False, now,
                     period_of(now), reserved_pusd=1000 + n)  # fmt: skip


def _done(row: LedgerRow, n: int) -> LedgerRow:
    return row.terminal(
        "ok", prompt_tokens=n, completion_tokens=2 * n, usage_source="upstream", cost_pusd=7 * n
    )


class Spy:
    """Counts the writes that went inline and those queued for the writer."""

    def __init__(self, ledger: SQLiteLedger) -> None:
        self.inline: list[str] = []
        self.queued: list[str] = []
        inline, submit = ledger._write_inline, ledger._submit

        def spy_inline(kind: str, row: LedgerRow) -> bool:
            self.inline.append(f"{kind} {row.request_id}")
            return inline(kind, row)

        def spy_submit(kind: str, row: LedgerRow) -> asyncio.Future[bool]:
            self.queued.append(f"{kind} {row.request_id}")
            return submit(kind, row)

        ledger._write_inline = spy_inline  # type: ignore[method-assign]
        ledger._submit = spy_submit  # type: ignore[method-assign]


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SQLiteLedger]:
    led = SQLiteLedger(tmp_path / "ledger.db")
    await led.open()
    try:
        yield led
    finally:
        await led.close()


def _dump(path: str) -> tuple[list[Any], list[Any]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT * FROM requests ORDER BY request_id").fetchall()
        rollups = conn.execute("SELECT * FROM rollups ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11").fetchall()
        return rows, rollups
    finally:
        conn.close()


ROWS = [_row(i, model=("m/a", "m/b")[i % 2]) for i in range(6)]
TERMINAL = [_done(r, i) for i, r in enumerate(ROWS)]
LATE, RECORDED = _done(ROWS[0], 99), _done(_row(40), 40)


async def _script(ledger: SQLiteLedger, paced: bool) -> list[Any]:
    """Begins, finishes (one twice), a record (twice), a duplicate begin: what each returned or
    raised. `paced`: a turn of the loop after each write (as the upstream's answer gives)."""
    out: list[Any] = []

    async def pace() -> None:
        if paced:
            await asyncio.sleep(0)

    for i, row in enumerate(ROWS):
        if i != 3:
            await ledger.begin(row)
            await pace()
            out.append(await ledger.finish(TERMINAL[i]))
            await pace()
    out.append(await ledger.finish(LATE))  # already terminal: not changed again
    await pace()
    try:
        await ledger.begin(ROWS[1])
    except LedgerUnavailable as exc:
        out.append(str(exc))
    await pace()
    out.append(await ledger.record(RECORDED))
    await pace()
    out.append(await ledger.record(RECORDED))  # already there: ignored
    await pace()
    await ledger.begin(ROWS[3])  # left in flight
    return out


@pytest.mark.parametrize("paced", [True, False])
async def test_inline_and_queued_writes_make_the_same_rows_and_rollups(tmp_path: Path, paced: bool) -> None:
    """`paced`: one write per turn of the loop, every one inline; else back to back in one turn
    (the first inline, then queued: load), mixed."""
    results, dumps, spies = [], [], []
    for name, inline in (("inline", True), ("queued", False)):
        terminal: list[str] = []
        led = SQLiteLedger(tmp_path / f"{name}.db", on_terminal=lambda r, t=terminal: t.append(r.request_id))
        await led.open()
        led._inline = inline
        spy = Spy(led)
        try:
            got = await _script(led, paced)
        finally:
            await led.close()
        results.append((got, terminal))
        dumps.append(_dump(led.path))
        spies.append(spy)
    assert results[0] == results[1]
    assert results[0][0] == [True] * 5 + [False, "duplicate request id req-001", True, False]
    assert dumps[0] == dumps[1]
    rows, _ = dumps[0]
    assert [r[0] for r in rows if IN_FLIGHT in r] == ["req-003"]
    assert spies[1].inline == [] and len(spies[1].queued) == 15
    if paced:  # one write at a time on a quiet ledger: every one inline
        assert len(spies[0].inline) == 15 and spies[0].queued == []
    else:
        assert spies[0].inline and spies[0].queued


async def test_synchronous_full_never_commits_inline(tmp_path: Path) -> None:
    led = SQLiteLedger(tmp_path / "full.db", synchronous="full")
    await led.open()
    spy = Spy(led)
    try:
        row = _row(1)
        await led.begin(row)
        assert await led.finish(_done(row, 1)) is True
    finally:
        await led.close()
    assert spy.inline == [] and spy.queued == ["begin req-001", "finish req-001"]


async def test_an_inline_commit_that_fails_raises_what_a_queued_one_raises(tmp_path: Path) -> None:
    """Another connection holds the write lock: the commit fails; the caller gets the same
    LedgerUnavailable either way, the ledger reports itself unwritable, then recovers."""
    errors = []
    for name, inline in (("inline", True), ("queued", False)):
        commits: list[tuple[int, bool]] = []
        led = SQLiteLedger(tmp_path / f"{name}.db", on_commit=lambda n, _t, ok, c=commits: c.append((n, ok)))
        await led.open()
        led._inline = inline
        spy = Spy(led)
        assert led._conn is not None
        led._conn.execute("PRAGMA busy_timeout=0")
        blocker = sqlite3.connect(led.path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            row = _row(1)
            with pytest.raises(LedgerUnavailable) as caught:
                await led.begin(row)
            errors.append(str(caught.value))
            with pytest.raises(LedgerUnavailable, match="could not commit"):
                await led.record(_done(_row(2), 2))
            assert await led.writable() is False
            blocker.execute("ROLLBACK")
            assert await led.writable() is True
            await asyncio.sleep(0)
            await led.begin(row)  # the failed transaction left nothing behind
            await asyncio.sleep(0)
            assert await led.finish(_done(row, 1)) is True
        finally:
            blocker.close()
            await led.close()
        assert commits == [(1, False), (1, False), (1, True), (1, True)]
        assert (len(spy.inline), len(spy.queued)) == ((3, 1) if inline else (0, 4))  # the record: same turn
    assert errors == ["the ledger could not commit"] * 2


async def test_a_second_write_in_the_same_turn_is_queued_and_group_committed(ledger: SQLiteLedger) -> None:
    """Records (rejected requests: nothing in flight) arriving together in one turn of the loop:
    the first commits inline, the rest are load and group-commit; the next lone write is still
    queued (the last commit was a batch), the one after a lone commit inline again."""
    spy = Spy(ledger)
    rows = [_done(_row(i), i) for i in range(6)]
    assert await asyncio.gather(*(ledger.record(r) for r in rows[:4])) == [True] * 4
    assert spy.inline == ["record req-000"]
    assert spy.queued == [f"record req-{i:03d}" for i in range(1, 4)]
    await asyncio.sleep(0)
    assert await ledger.record(rows[4]) is True
    assert spy.queued[-1] == "record req-004"
    await asyncio.sleep(0)
    assert await ledger.record(rows[5]) is True
    assert spy.inline[-1] == "record req-005"
    assert [r.status for r in await ledger.rows()] == ["ok"] * 6


async def test_while_another_request_is_in_flight_writes_are_queued(ledger: SQLiteLedger) -> None:
    """Another row begun and not finished: its finish could join a batch, so writes go to the
    writer (group commit); once it is finished, a lone write commits inline again."""
    spy = Spy(ledger)
    first, second = _row(1), _row(2)
    await ledger.begin(first)
    await asyncio.sleep(0)
    await ledger.begin(second)
    await asyncio.sleep(0)
    assert await ledger.finish(_done(second, 2)) is True
    await asyncio.sleep(0)
    assert await ledger.finish(_done(first, 1)) is True  # the last one in flight
    await asyncio.sleep(0)
    await ledger.record(_done(_row(3), 3))
    assert spy.inline == ["begin req-001", "finish req-001", "record req-003"]
    assert spy.queued == ["begin req-002", "finish req-002"]
    assert [r.status for r in await ledger.rows()] == ["ok"] * 3


async def test_writes_while_the_writer_holds_the_connection_are_queued_in_order(
    ledger: SQLiteLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During the writer's RESTART checkpoint (the connection in a thread) nothing commits
    inline: writes wait in order and commit after it, a begin before its finish."""
    entered, release = threading.Event(), threading.Event()
    checkpoint = ledger._checkpoint

    def held(mode: str, conn: sqlite3.Connection | None = None) -> None:
        if mode == "RESTART":
            entered.set()
            release.wait(10)
        checkpoint(mode, conn)

    monkeypatch.setattr(ledger, "_checkpoint", held)
    spy = Spy(ledger)
    ledger._next_checkpoint = 0.0
    ledger._poke()
    for _ in range(200):  # the writer starts the PASSIVE checkpoint, then the RESTART one
        if entered.is_set():
            break
        await asyncio.sleep(0.01)
    assert entered.is_set() and ledger._busy
    row = _row(1)
    begin = asyncio.ensure_future(ledger.begin(row))
    await asyncio.sleep(0)
    finish = asyncio.ensure_future(ledger.finish(_done(row, 3)))
    await asyncio.sleep(0.05)
    assert not begin.done() and not finish.done()
    assert spy.queued == ["begin req-001", "finish req-001"] and spy.inline == []
    release.set()
    await begin
    assert await finish is True
    assert not ledger._busy
    (found,) = await ledger.rows()
    assert found.status == "ok" and found.cost_pusd == 21


async def test_the_checkpoint_still_runs_when_every_write_is_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_ledger, "CHECKPOINT_INTERVAL", 0.05)
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        await _checkpoints_run(ledger, monkeypatch)
    finally:
        await ledger.close()


async def _checkpoints_run(ledger: SQLiteLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[str] = []
    checkpoint = ledger._checkpoint

    def counted(mode: str, conn: sqlite3.Connection | None = None) -> None:
        modes.append(mode)
        checkpoint(mode, conn)

    monkeypatch.setattr(ledger, "_checkpoint", counted)
    spy = Spy(ledger)
    for i in range(30):
        row = _row(i)
        await ledger.begin(row)
        await asyncio.sleep(0)
        await ledger.finish(_done(row, i))
        await asyncio.sleep(0.01)
    # ~0.3 s of writes at one checkpoint per 0.05 s: each a PASSIVE, then the writer's RESTART
    assert modes.count("RESTART") >= 2 and modes.count("PASSIVE") >= modes.count("RESTART")
    assert len(spy.inline) >= 50  # a write meeting the RESTART checkpoint is queued
