"""`together-meter report` and `estimate`, run as subprocesses against a ledger written in tmp_path."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from decimal import Decimal
from pathlib import Path

from proxy.ledger import LedgerRow, now_us, period_of
from proxy.ledger.sqlite import SQLiteLedger
from tests.test_cli import ROOT, run_cli

CONFIG = str(ROOT / "config" / "example.yaml")
SEED = "arcee-ai/maestro-reasoning"
V3 = "deepseek-ai/DeepSeek-V3"


def _row(i: int, started: int, **kw: object) -> LedgerRow:
    base: dict[str, object] = {
        "request_id": f"req_{i}",
        "tenant": "acme",
        "key_id": "k",
        "model": SEED,
        "endpoint": "chat",
        "mode": "serverless",
        "feature": "chat",
        "environment": "prod",
        "stream": False,
        "started_us": started,
        "period": period_of(started),
        "status": "ok",
        "finished_us": started + 1000,
        "prompt_tokens": 3000,
        "completion_tokens": 1000,
        "usage_source": "upstream",
        "cost_pusd": 6_000_000_000,
    }
    base.update(kw)
    return LedgerRow(**base)  # type: ignore[arg-type]


async def write_ledger(path: Path) -> tuple[str, list[LedgerRow]]:
    """Six recent rows: 3 acme seed-model, 1 globex V3, 1 estimated, 1 unknown cost; 1 in flight."""
    started = now_us() - 3_600_000_000  # an hour ago: inside the current month unless it just began
    rows = [
        _row(1, started),
        _row(2, started + 1),
        _row(3, started + 2, feature="search"),
        _row(4, started + 3, tenant="globex", model=V3, cost_pusd=5_000_000_000),
        _row(5, started + 4, usage_source="estimated", cost_pusd=6_000_000_001),
        _row(6, started + 5, model="x/unpriced", cost_pusd=None),
    ]
    ledger = SQLiteLedger(path)
    await ledger.open()
    for r in rows:
        assert await ledger.record(r)
    await ledger.begin(_row(7, started + 6, status="in_flight", cost_pusd=None, prompt_tokens=None))
    await ledger.close()
    return rows[0].period, rows


async def test_report_json_totals_equal_the_ledger(tmp_path: Path) -> None:
    """JSON totals are the exact sums of the terminal rows; flagged rows are counted apart."""
    month, rows = await write_ledger(tmp_path / "l.db")
    code, out, err = await run_cli(
        "report", "--config", CONFIG, "--ledger", str(tmp_path / "l.db"), "--month", month, "--format", "json"
    )
    assert code == 0, err
    data = json.loads(out)
    total = data["total"]
    assert total["requests"] == 6
    assert total["input_tokens"] == 18_000
    assert Decimal(total["cost_usd"]) == Decimal(sum(r.cost_pusd or 0 for r in rows)).scaleb(-12)
    assert (total["estimated_usage"], total["cost_unknown"]) == (1, 1)
    assert {g["key"] for g in data["groups"]} == {SEED, V3, "x/unpriced"}


async def test_report_csv_by_tenant_and_table(tmp_path: Path) -> None:
    """CSV by tenant parses back; the table names the groups and the forecast window."""
    month, _ = await write_ledger(tmp_path / "l.db")
    base = ("report", "--config", CONFIG, "--ledger", str(tmp_path / "l.db"), "--month", month)
    code, out, err = await run_cli(*base, "--by", "tenant", "--format", "csv")
    assert code == 0, err
    lines = {r["tenant"]: r for r in csv.DictReader(io.StringIO(out))}
    assert lines["globex"]["cost_usd"] == "0.005"
    assert lines["total"]["requests"] == "6"
    code, out, err = await run_cli(*base, "--tenant", "acme")
    assert code == 0, err
    assert SEED in out and "globex" not in out.split("Month-end forecast")[0]
    if time.gmtime().tm_mday > 1 or time.gmtime().tm_hour > 1:
        assert "Month-end forecast" in out and "run rate over" in out


async def test_estimate_seed_example_prints_exact_numbers() -> None:
    """The seed: $0.006000 per request, $12,000.00 a month Serverless and Batch (no batch discount)."""
    code, out, err = await run_cli(
        "estimate",
        "--config",
        CONFIG,
        "--model",
        SEED,
        "--requests-per-month",
        "2000000",
        "--input-tokens",
        "3000",
        "--output-tokens",
        "1000",
    )
    assert code == 0, err
    assert (
        "arcee-ai/maestro-reasoning at $0.90/$3.30, 3,000 in / 1,000 out, 2,000,000 requests/month -> "
        "$0.006000 per request, $12,000.00 per month Serverless, $12,000.00 Batch (no batch discount)"
    ) in out


async def test_estimate_from_ledger_with_dedicated_json(tmp_path: Path) -> None:
    """Measured over 7 days and scaled to 30; Dedicated gives effective $/1M and break-even."""
    await write_ledger(tmp_path / "l.db")
    code, out, err = await run_cli(
        "estimate",
        "--config",
        CONFIG,
        "--ledger",
        str(tmp_path / "l.db"),
        "--from-ledger",
        "--window",
        "7d",
        "--model",
        SEED,
        "--tenant",
        "acme",
        "--dedicated-monthly-usd",
        "1.5",
        "--compare",
        V3,
        "--format",
        "json",
    )
    assert code == 0, err
    first, second = json.loads(out)["estimates"]
    assert first["traffic"]["input_tokens"] == "3000"
    # 4 requests x 30 days / the window widened to whole days: 7 days and today's part of an 8th
    assert 15 < Decimal(first["traffic"]["requests_per_month"]) <= Decimal("17.143")
    assert "widened to whole days" in first["traffic"]["source"]
    assert first["dedicated"]["break_even_monthly_tokens"] == 1_000_000  # $1.5 / $1.50 per 1M
    assert second["model"] == V3


async def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    """A bad month, missing estimate inputs, an unknown model or a missing ledger: exit 2."""
    await write_ledger(tmp_path / "l.db")
    ledger = str(tmp_path / "l.db")
    for args in (
        ("report", "--config", CONFIG, "--ledger", ledger, "--month", "2026-13"),
        ("report", "--config", CONFIG, "--ledger", str(tmp_path / "none.db"), "--month", "2026-11"),
        ("report", "--config", CONFIG, "--month", "2026-11", "--by", "colour"),
        ("estimate", "--config", CONFIG, "--model", SEED),
        (
            "estimate",
            "--config",
            CONFIG,
            "--model",
            "no/such",
            "--requests-per-month",
            "1",
            "--input-tokens",
            "1",
            "--output-tokens",
            "1",
        ),
        ("estimate", "--config", CONFIG, "--from-ledger", "--ledger", ledger, "--window", "7w"),
    ):
        code, _, err = await run_cli(*args)
        assert code == 2, (args, err)


async def test_report_chargeback_splits_a_dedicated_endpoint(tmp_path: Path) -> None:
    """`report --chargeback` prints, as JSON, CSV and a table, charges that add up to the endpoint's cost."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"prices: {ROOT / 'config' / 'prices.yaml'}\n"
        f"ledger: {{path: {tmp_path / 'l.db'}}}\n"
        "tenants: {acme: {}, globex: {}}\n"
        f"dedicated_endpoints:\n  reasoning: {{model: {SEED}, hourly_usd: 1.5, hours_per_month: 720}}\n",
        encoding="utf-8",
    )
    month, _ = await write_ledger(tmp_path / "l.db")  # acme: 4 seed-model rows with usage, 16,000 tokens
    base = ("report", "--config", str(config), "--month", month, "--chargeback")
    code, out, err = await run_cli(*base, "--format", "json")
    assert code == 0, err
    (ep,) = json.loads(out)["endpoints"]
    assert (ep["endpoint"], ep["model"], ep["monthly_usd"], ep["tokens"]) == (
        "reasoning",
        SEED,
        "1080",
        16_000,
    )
    (acme,) = ep["tenants"]
    assert (acme["tenant"], acme["share"], acme["charge_usd"]) == ("acme", "1", "1080")
    assert acme["effective_usd_per_mtok"] == "67500"
    assert Decimal(acme["serverless_usd"]) == Decimal("0.024000000001")
    code, out, err = await run_cli(*base, "--format", "csv")
    assert code == 0, err
    lines = {r["tenant"]: r for r in csv.DictReader(io.StringIO(out))}
    assert lines["acme"]["charge_usd"] == lines["total"]["charge_usd"] == "1080"
    code, out, err = await run_cli(*base)
    assert code == 0, err
    assert "reasoning" in out and "$1,080.00" in out and "$67,500.0000" in out
    code, _, err = await run_cli("report", "--config", CONFIG, "--month", month, "--chargeback")
    assert code == 2 and "no dedicated_endpoints" in err


async def test_report_of_an_unknown_tenant_exits_2(tmp_path: Path) -> None:
    """--tenant neither in the config nor in the month's ledger: exit 2 naming it and the known ones."""
    month, _ = await write_ledger(tmp_path / "l.db")
    base = ("report", "--config", CONFIG, "--ledger", str(tmp_path / "l.db"), "--month", month)
    code, out, err = await run_cli(*base, "--tenant", "nobody")
    assert code == 2 and out == ""
    assert "no tenant 'nobody'" in err and "acme, globex" in err and month in err


async def test_report_of_a_tenant_only_in_the_ledger_or_only_in_the_config(tmp_path: Path) -> None:
    """A tenant since removed from the config but in the ledger is reported; a configured tenant
    without rows gets an empty report; both exit 0."""
    path = tmp_path / "l.db"
    month, _ = await write_ledger(path)
    ledger = SQLiteLedger(path)
    await ledger.open()
    assert await ledger.record(_row(9, now_us() - 3_600_000_000, tenant="initech"))
    await ledger.close()
    base = ("report", "--config", CONFIG, "--ledger", str(path), "--month", month, "--format", "json")
    code, out, err = await run_cli(*base, "--tenant", "initech")
    assert code == 0, err
    assert json.loads(out)["total"]["requests"] == 1
    code, out, err = await run_cli(
        "report",
        "--config",
        CONFIG,
        "--ledger",
        str(path),
        "--month",
        "2020-01",
        "--tenant",
        "globex",
        "--format",
        "json",
    )
    assert code == 0, err
    assert json.loads(out)["total"]["requests"] == 0


async def test_report_into_a_closed_pipe_exits_141_quietly(tmp_path: Path) -> None:
    """`report ... | head` when head has gone: exit 141 (as SIGPIPE would), nothing on stderr."""
    month, _ = await write_ledger(tmp_path / "l.db")
    base = ("report", "--config", CONFIG, "--ledger", str(tmp_path / "l.db"), "--month", month)
    for fmt in ("table", "json", "csv"):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.cli",
                *base,
                "--format",
                fmt,
                cwd=ROOT,
                stdout=write,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            os.close(write)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert (proc.returncode, err.decode()) == (141, ""), fmt


def test_report_table_in_a_narrow_terminal_shows_every_cost_whole(tmp_path: Path) -> None:
    """On a 60-column terminal (a pty, COLUMNS=60) no figure is cut to '…': every cost of the
    JSON report appears whole in the table."""
    month, _ = asyncio.run(write_ledger(tmp_path / "l.db"))
    base = ["report", "--config", CONFIG, "--ledger", str(tmp_path / "l.db"), "--month", month]
    data = json.loads(
        subprocess.run(
            [sys.executable, "-m", "proxy.cli", *base, "--format", "json"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    screen = _on_a_terminal([sys.executable, "-m", "proxy.cli", *base], columns=60)
    assert "…" not in screen, screen
    for line in [*data["groups"], data["total"]]:
        for cost in (line["cost_usd"], line["avg_cost_usd"]):
            assert cost is None or cost in screen, (cost, screen)


def _on_a_terminal(argv: list[str], columns: int) -> str:
    """What `argv` prints on a pseudo-terminal `columns` wide (ANSI styles removed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm"}
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1)
            try:
                chunk = os.read(leader, 65536) if ready else b""
            except OSError:  # EIO: the terminal's other end closed (the process exited)
                break
            chunks.append(chunk)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        os.close(leader)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode()).replace("\r\n", "\n")


async def test_estimate_compare_without_model(tmp_path: Path) -> None:
    """--compare M1,M2 alone prices the given traffic on M1 and M2."""
    code, out, err = await run_cli(
        "estimate",
        "--config",
        CONFIG,
        "--requests-per-month",
        "2000000",
        "--input-tokens",
        "3000",
        "--output-tokens",
        "1000",
        "--compare",
        f"{SEED},{V3}",
        "--format",
        "json",
    )
    assert code == 0, err
    found = json.loads(out)["estimates"]
    assert [(e["model"], e["serverless"]["monthly_usd"]) for e in found] == [(SEED, "12000"), (V3, "10000")]
