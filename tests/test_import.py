"""`db import` (proxy/cli/db.py run_import): a `db export` file back into a ledger, all or nothing.

Re-importing adds nothing; a malformed line or a request id already there with other content
stops the import with the line named and nothing imported; a SQLite ledger moved to PostgreSQL
reports the same figures to the pico-dollar, with budget accounts equal to the rows.
"""

from __future__ import annotations

import asyncio
import calendar
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy.cli.db import BadLine, run_import
from proxy.config import Config, load_config
from proxy.core.records import TERMINAL_STATUSES
from proxy.core.report import GROUPINGS
from proxy.core.retention import export_record
from proxy.core.rollups import ROLLUP_KEY, RollupFilter, rollup_rows
from proxy.ledger import LedgerRow
from proxy.ledger.postgres import PostgresLedger
from proxy.ledger.sqlite import SQLiteLedger
from tests.test_cli import ROOT, run_cli

CONFIG = ROOT / "config" / "example.yaml"
START = calendar.timegm((2026, 1, 30, 0, 0, 0)) * 1_000_000  # rows over two periods


def rows(n: int = 60) -> list[LedgerRow]:
    """Terminal rows of every status, over two months, some without usage or cost."""
    out = []
    for i in range(n):
        ts = START + i * 7_200_000_000
        status = TERMINAL_STATUSES[i % len(TERMINAL_STATUSES)]
        usage = i % 5 != 0
        out.append(
            LedgerRow(f"req_{i:04d}", ("acme", "globex")[i % 2], "k", ("m/a", "m/b")[i % 3 == 0], "chat",
                      "serverless", ("chat", None)[i % 4 == 0], ("prod", None)[i % 3 == 0], bool(i % 2), ts,
                      "2026-01" if ts < START + 2 * 86_400_000_000 else "2026-02", status, ts + 9, 200,
                      10 * i if usage else None, i if usage else None, i if usage else None,
                      usage_source="upstream" if usage else "estimated",
                      cost_pusd=None if i % 7 == 0 else 123_456_789 * i, reserved_pusd=10**9)
        )  # fmt: skip
    return out


async def _sqlite(path: Path, written: list[LedgerRow]) -> SQLiteLedger:
    ledger = SQLiteLedger(path)
    await ledger.open()
    for r in written:
        assert await ledger.record(r)
    await ledger.close()
    return ledger


def _export(path: Path, written: list[LedgerRow]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(export_record(r)) + b"\n" for r in written))
    return path


async def _import(config: Config, ledger: Path | None, file: Path) -> int:
    """`db import FILE` in a worker thread (it runs its own event loop), its exit code."""
    return await asyncio.to_thread(run_import, config, None if ledger is None else str(ledger), str(file))


def _config(tmp_path: Path, ledger: dict[str, Any]) -> Config:
    data = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    data["ledger"] = ledger
    data.pop("keys_file", None)
    data["prices"] = str(ROOT / "config" / "prices.yaml")
    path = tmp_path / f"{ledger.get('backend', 'sqlite')}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(path)


async def test_export_import_round_trip_and_reimport_adds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows and rollups of the new ledger equal the old one's; a second import adds no row."""
    written = rows()
    await _sqlite(tmp_path / "a.db", written)
    code, _, err = await run_cli("db", "export", "--config", str(CONFIG), "--ledger", str(tmp_path / "a.db"),
                                 "-o", str(tmp_path / "a.jsonl"))  # fmt: skip
    assert code == 0, err
    config = load_config(CONFIG)
    assert await _import(config, tmp_path / "b.db", tmp_path / "a.jsonl") == 0
    assert "imported 60 row(s)" in capsys.readouterr().err
    target = SQLiteLedger(tmp_path / "b.db")
    assert await target.rows() == written
    assert await target.rollups(ROLLUP_KEY, RollupFilter()) == rollup_rows(written, config.budgets.periods)
    assert await _import(config, tmp_path / "b.db", tmp_path / "a.jsonl") == 0
    err = capsys.readouterr().err
    assert "imported 0 row(s)" in err and "60 already in the ledger" in err, err
    assert await target.rows() == written


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda d: d.update(cost_pusd="12"),
            "line 3: cost_pusd must be a non-negative integer or null, got '12'",
        ),
        (lambda d: d.update(status="in_flight"), "line 3: status in_flight: export from a stopped ledger"),
        (lambda d: d.pop("tenant"), "line 3: missing tenant"),
        (lambda d: d.update(cost_usd="1"), "line 3: cost_usd '1' does not match cost_pusd"),
        (lambda d: d.update(started_at="2020-01-01T00:00:00.000000+00:00"), "line 3: started_at"),
        (lambda d: d.update(stream=1), "line 3: stream must be true or false, got 1"),
    ],
)
async def test_a_malformed_line_is_named_and_nothing_is_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, words: str
) -> None:
    """A bad line stops the import (exit 2) with its number and what is wrong; no line of the file is in."""
    lines = [export_record(r) for r in rows(5)]
    change(lines[2])
    (tmp_path / "bad.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    code = await _import(load_config(CONFIG), tmp_path / "b.db", tmp_path / "bad.jsonl")
    err = capsys.readouterr().err
    assert code == 2 and words in err and "nothing was imported" in err, err
    assert await SQLiteLedger(tmp_path / "b.db").rows() == []


async def test_an_error_after_many_chunks_still_imports_nothing(tmp_path: Path) -> None:
    """The import is one transaction: 12,000 good rows then a bad one leave the ledger empty."""
    ledger = SQLiteLedger(tmp_path / "b.db")
    good = rows(12_000)

    def numbered() -> Any:
        yield from enumerate(good, 1)
        raise BadLine("line 12001: not valid JSON")

    with pytest.raises(BadLine):
        await ledger.import_rows(numbered())
    assert await ledger.rows() == [] and await ledger.rollups(ROLLUP_KEY, RollupFilter()) == []


async def test_a_different_row_under_the_same_id_stops_the_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request id already in the ledger with another cost: exit 1, the conflict named, nothing added."""
    written = rows(10)
    await _sqlite(tmp_path / "b.db", written[:3])
    changed = [*written[:2], LedgerRow(**{**_fields(written[2]), "cost_pusd": 1}), *written[3:]]
    _export(tmp_path / "c.jsonl", changed)
    code = await _import(load_config(CONFIG), tmp_path / "b.db", tmp_path / "c.jsonl")
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"line 3: request_id {written[2].request_id} is already in the ledger with other content" in err
    assert f"cost_pusd: {written[2].cost_pusd} there, 1 here" in err
    assert await SQLiteLedger(tmp_path / "b.db").rows() == written[:3]


def _fields(r: LedgerRow) -> dict[str, Any]:
    return {f: getattr(r, f) for f in LedgerRow.__dataclass_fields__}


async def test_sqlite_to_postgres_reports_equal_to_the_pico_dollar(pg_dsn: str, tmp_path: Path) -> None:
    """docs/deployment.md's move: export from SQLite, import into PostgreSQL; every report is equal,
    the accounts equal the rows' costs, a second import adds nothing and a conflict stops it."""
    written = rows(400)
    await _sqlite(tmp_path / "a.db", written)
    sqlite_cfg = _config(tmp_path, {"path": str(tmp_path / "a.db")})
    pg_cfg = _config(tmp_path, {"backend": "postgres", "dsn": pg_dsn})
    code, _, err = await run_cli("db", "export", "--config", sqlite_cfg.file, "-o", str(tmp_path / "a.jsonl"))
    assert code == 0, err
    for _ in range(2):  # the second import finds every row there
        assert await _import(pg_cfg, None, tmp_path / "a.jsonl") == 0
    for month in ("2026-01", "2026-02"):
        for by in GROUPINGS:
            reports = []
            for cfg in (sqlite_cfg, pg_cfg):
                code, out, err = await run_cli("report", "--config", cfg.file, "--month", month, "--by", by,
                                               "--format", "json")  # fmt: skip
                assert code == 0, err
                reports.append(json.loads(out))
            assert reports[0] == reports[1], (month, by)
    target = PostgresLedger(pg_dsn)
    try:
        assert await target.rows() == written
        for month in ("2026-01", "2026-02"):
            spent = sum(r.cost_pusd or 0 for r in written if r.period == month and r.tenant == "acme")
            assert (await target.accounts(month))[("acme", None)] == (spent, 0)
        _export(tmp_path / "c.jsonl", [LedgerRow(**{**_fields(written[7]), "tenant": "initech"})])
        assert await _import(pg_cfg, None, tmp_path / "c.jsonl") == 1
        assert await target.rows() == written
    finally:
        await target.close()


async def test_rows_of_a_pruned_month_are_skipped_not_counted_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `db prune`, importing the pruned month's rows again adds nothing: its rollups hold them."""
    written = rows()
    ledger = await _sqlite(tmp_path / "b.db", written)
    _export(tmp_path / "a.jsonl", written)
    before = await ledger.rollups(ROLLUP_KEY, RollupFilter())
    assert (await ledger.prune("2026-02")).periods == ("2026-01",)
    assert await _import(load_config(CONFIG), tmp_path / "b.db", tmp_path / "a.jsonl") == 0
    january = sum(r.period == "2026-01" for r in written)
    assert f"{january} of pruned months skipped" in capsys.readouterr().err
    assert await ledger.rollups(ROLLUP_KEY, RollupFilter()) == before
