"""`together-meter db prune|export|migrate`: retention, billing-pipeline exports, schema migrations."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from proxy.config import Config
from proxy.core.report import ReportError
from proxy.core.retention import check_period, export_aggregate, export_record
from proxy.ledger import Ledger
from proxy.ledger.factory import open_ledger


def reading_ledger(config: Config, path: str | None) -> Ledger:
    """The configured ledger, for reading and pruning (no writer, no reaper: a proxy may be running)."""
    if config.ledger.backend == "sqlite":
        file = path or config.ledger.path
        if not Path(file).exists():
            raise ReportError(f"no ledger at {file} (set ledger.path or pass --ledger)")
    elif path is not None:
        raise ReportError("--ledger names a SQLite file; this config's ledger is PostgreSQL (ledger.dsn)")
    return open_ledger(config.ledger, path=path, file=config.file)


def run_migrate(config: Config) -> int:
    """Apply the PostgreSQL ledger's pending schema migrations and say which."""
    if config.ledger.backend != "postgres":
        print("ledger backend sqlite: the proxy creates the schema when it opens the file; nothing to do")
        return 0
    from proxy.ledger.postgres import PostgresLedger

    ledger = reading_ledger(config, None)
    assert isinstance(ledger, PostgresLedger)

    async def run() -> tuple[list[str], int]:
        try:
            return await ledger.migrate()
        finally:
            await ledger.close()

    applied, version = asyncio.run(run())
    for label in applied:
        print(f"applied {label}")
    print(f"{ledger.where}: schema at version {version}" + ("" if applied else " (up to date)"))
    return 0


def run_prune(config: Config, path: str | None, before: str, now_us: int | None = None) -> int:
    """Fold every period before `before` into daily aggregates; the current period is refused."""
    try:
        check_period(before)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    periods = config.budgets.periods
    current = periods.of(now_us if now_us is not None else time.time_ns() // 1000)
    if before > current:
        raise ReportError(
            f"--before {before} would prune the current period {current}: budgets and the month-end "
            f"forecast read its rows; the latest allowed is --before {current}"
        )
    ledger = reading_ledger(config, path)

    async def run() -> Any:
        try:
            return await ledger.prune(before, periods)
        finally:
            with contextlib.suppress(Exception):
                await ledger.close()

    result = asyncio.run(run())
    months = ", ".join(result.periods) or "none"
    print(
        f"pruned {result.rows} row(s) before {before} into {result.aggregates} aggregate line(s); "
        f"periods: {months}"
    )
    return 0


def run_export(
    config: Config,
    path: str | None,
    month: str | None,
    since: str | None,
    aggregates: bool,
    output: str | None,
) -> int:
    """Rows (or a pruned month's aggregates) as JSON Lines, oldest first, streamed page by page."""
    if month is not None:
        try:
            check_period(month, "--month")
        except ValueError as exc:
            raise ReportError(str(exc)) from None
    if aggregates and month is None:
        raise ReportError("--aggregates needs --month")
    since_us = None if since is None else _since_us(since)
    ledger = reading_ledger(config, path)

    async def run(out: IO[bytes]) -> int:
        n = 0
        try:
            if aggregates:
                assert month is not None
                for a in await ledger.aggregates(month):
                    out.write(orjson.dumps(export_aggregate(a)) + b"\n")
                    n += 1
            else:
                async for row in ledger.iter_rows(period=month, since_us=since_us):
                    out.write(orjson.dumps(export_record(row)) + b"\n")
                    n += 1
        finally:
            with contextlib.suppress(Exception):
                await ledger.close()
        return n

    with _open_output(output) as out:
        n = asyncio.run(run(out))
    print(f"exported {n} {'aggregate line' if aggregates else 'row'}(s)", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _open_output(output: str | None) -> Iterator[IO[bytes]]:
    if output is None or output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    tmp = Path(output + ".partial")
    with tmp.open("wb") as f:
        yield f
    tmp.replace(output)  # a reader never sees half an export


def _since_us(value: str) -> int:
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(f"--since must be an ISO date or time like 2026-11-01, got {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1_000_000)
