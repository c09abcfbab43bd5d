"""`together-meter db prune|export|import|migrate`: retention, exports, imports, schema migrations."""

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
from proxy.core.retention import (
    ImportConflict,
    Numbered,
    check_period,
    export_record,
    export_rollup,
    import_record,
)
from proxy.core.rollups import ROLLUP_KEY, RollupFilter
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


def run_migrate(config: Config, path: str | None = None) -> int:
    """Apply the ledger's pending schema migrations and say which (SQLite: make its rollups)."""
    ledger = reading_ledger(config, path)
    if config.ledger.backend != "postgres":
        from proxy.ledger.sqlite import SQLiteLedger

        assert isinstance(ledger, SQLiteLedger)
        done, _ = asyncio.run(ledger.migrate())
        print(f"{ledger.path}: " + ("; ".join(done) if done else "schema and rollups up to date"))
        return 0
    from proxy.ledger.postgres import PostgresLedger

    assert isinstance(ledger, PostgresLedger)

    async def run() -> tuple[list[str], int]:
        try:
            return await ledger.migrate()
        finally:
            await ledger.close()

    applied, version = asyncio.run(run())
    for label in applied:
        print(f"applied {label}")
    for period in ledger.partitions_made:
        print(f"made the monthly partition of {period}")
    print(f"{ledger.where}: schema at version {version}" + ("" if applied else " (up to date)"))
    return 0


def run_prune(config: Config, path: str | None, before: str, now_us: int | None = None) -> int:
    """Delete the rows of every period before `before` (their rollups stay); the current period is refused."""
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
            return await ledger.prune(before)
        finally:
            with contextlib.suppress(Exception):
                await ledger.close()

    result = asyncio.run(run())
    months = ", ".join(result.periods) or "none"
    print(
        f"pruned {result.rows} row(s) before {before}; their rollups stay, so reports of those "
        f"months are unchanged; periods: {months}"
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
    """Rows (or a month's rollup lines) as JSON Lines, oldest first, streamed page by page."""
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
                for r in await ledger.rollups(ROLLUP_KEY, RollupFilter(periods=(month,))):
                    out.write(orjson.dumps(export_rollup(r)) + b"\n")
                    n += 1
            else:
                async for row in ledger.iter_rows(period=month, since_us=since_us):
                    out.write(orjson.dumps(export_record(row, config.prices.get(row.model))) + b"\n")
                    n += 1
        finally:
            with contextlib.suppress(Exception):
                await ledger.close()
        return n

    with _open_output(output) as out:
        n = asyncio.run(run(out))
    print(f"exported {n} {'rollup line' if aggregates else 'row'}(s)", file=sys.stderr)
    return 0


class BadLine(ReportError):
    """A line of an import file that is not a `db export` row; the message names the line."""


def run_import(config: Config, path: str | None, file: str) -> int:
    """Load a `db export` file into the configured ledger: all of it in one transaction, or nothing."""
    if not Path(file).is_file():
        raise ReportError(f"no file {file} to import")
    ledger = _importing_ledger(config, path)

    async def run() -> Any:
        try:
            return await ledger.import_rows(read_export(file))
        finally:
            with contextlib.suppress(Exception):
                await ledger.close()

    try:
        result = asyncio.run(run())
    except (BadLine, ImportConflict) as exc:
        print(f"error: {file}: {exc}; nothing was imported", file=sys.stderr)
        return 2 if isinstance(exc, BadLine) else 1
    rate = result.added / result.seconds if result.seconds > 0 else 0.0
    print(
        f"imported {result.added} row(s) from {file} in {result.seconds:.1f} s ({rate:,.0f} rows/s); "
        f"{result.read} line(s) read, {result.present} already in the ledger, "
        f"{result.pruned} of pruned months skipped",
        file=sys.stderr,
    )
    return 0


def _importing_ledger(config: Config, path: str | None) -> Ledger:
    """The configured ledger; a SQLite file that does not exist yet is made by the import."""
    if config.ledger.backend == "sqlite" and path is not None:
        return open_ledger(config.ledger, path=path, file=config.file)
    if config.ledger.backend == "sqlite":
        return open_ledger(config.ledger, file=config.file)
    return reading_ledger(config, path)


def read_export(file: str) -> Iterator[Numbered]:
    """The rows of a `db export` file, read line by line; BadLine names the first bad line."""
    with open(file, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BadLine(f"line {n}: not valid JSON ({exc})") from None
            try:
                yield n, import_record(data)
            except ValueError as exc:
                raise BadLine(f"line {n}: {exc}") from None


def cmd_db_import(args: Any) -> int:
    """`db import FILE [--config FILE] [--ledger PATH]` (wired in main.py's `db` subcommands)."""
    from proxy.config import load_config

    return run_import(load_config(args.config), args.ledger, args.file)


def add_import_command(dsub: Any, default_config: str) -> None:
    """The `db import` subcommand, for main.py's `db` parser."""
    di = dsub.add_parser("import", help="load a `db export` JSON Lines file (idempotent, all or nothing)")
    di.add_argument("file", help="the JSON Lines file `db export` wrote")
    di.add_argument("--config", default=default_config)
    di.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    di.set_defaults(func=cmd_db_import)


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
