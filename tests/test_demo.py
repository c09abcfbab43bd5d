"""`together-meter demo`, run as a subprocess from a scratch directory (not the repository)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import demo
from tests.test_cli import ROOT

DEFAULTS = ROOT / "proxy" / "config" / "defaults"
LINE_WAIT_S = 60.0


async def run_demo(cwd: Path, *args: str) -> tuple[int, str, str]:
    """`python -m proxy.cli demo ARGS` in `cwd`, bounded."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "demo",
        "--requests",
        "6",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("name", demo.DEFAULT_FILES)
def test_shipped_defaults_equal_the_repository_examples(name: str) -> None:
    """The config and price table shipped for `demo` are config/<name> byte for byte."""
    assert (DEFAULTS / name).read_bytes() == (ROOT / "config" / name).read_bytes(), (
        f"copy config/{name} to proxy/config/defaults/{name}: the demo runs on the shipped copy"
    )


async def test_demo_runs_anywhere_on_the_packaged_defaults_and_leaves_nothing(tmp_path: Path) -> None:
    """From an empty directory: exit 0, no file left there or in the temporary directory it
    names, and no /metrics URL printed once everything has stopped."""
    code, out, err = await run_demo(tmp_path)
    assert code == 0, (out, err)
    assert "tokens match the simulator's billing: yes" in out
    assert os.listdir(tmp_path) == []
    removed = re.search(r"removed (\S+) with the demo's ledger", out)
    assert removed is not None, out
    assert removed.group(1) not in os.listdir(os.path.dirname(removed.group(1)) or ".")
    assert "/metrics" not in out and "stopped: the proxy and the simulator are down" in out


async def test_demo_keep_leaves_ledger_and_config_and_says_how_to_report(tmp_path: Path) -> None:
    """--keep DIR leaves the ledger and the config there, and the report command it prints works."""
    code, out, err = await run_demo(tmp_path, "--keep", "kept")
    assert code == 0, (out, err)
    kept = tmp_path / "kept"
    assert sorted(os.listdir(kept)) == ["example.yaml", "ledger.db", "prices.yaml"]
    assert f"ledger kept in {kept / 'ledger.db'}" in out
    command = re.search(r"together-meter (report .*)", out)
    assert command is not None, out
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        *command.group(1).split(),
        "--format",
        "csv",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    report, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0
    assert report.decode().splitlines()[-1].startswith("total,6,")


async def test_demo_keep_refuses_a_directory_with_files(tmp_path: Path) -> None:
    """--keep DIR with files in it is a usage error (exit 2): the demo overwrites nothing."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "ledger.db").write_bytes(b"precious")
    code, out, err = await run_demo(tmp_path, "--keep", "kept")
    assert code == 2 and "not an empty directory" in err and out == ""
    assert (tmp_path / "kept" / "ledger.db").read_bytes() == b"precious"


async def test_demo_with_a_config_file(tmp_path: Path) -> None:
    """--config FILE (with its price table beside it) still works, from any directory."""
    config = tmp_path / "conf" / "my.yaml"
    config.parent.mkdir()
    config.write_bytes((ROOT / "config" / "example.yaml").read_bytes())
    (config.parent / "prices.yaml").write_bytes((ROOT / "config" / "prices.yaml").read_bytes())
    (tmp_path / "work").mkdir()
    code, out, err = await run_demo(tmp_path / "work", "--config", str(config))
    assert code == 0, (out, err)
    assert os.listdir(tmp_path / "work") == [] and sorted(os.listdir(config.parent)) == [
        "my.yaml",
        "prices.yaml",
    ]


async def test_keep_running_prints_live_urls_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    """--keep-running prints the /metrics URL while it serves; it answers; SIGINT stops it (exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "demo",
        "--requests",
        "4",
        "--keep-running",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        lines = await asyncio.wait_for(_lines_until(proc.stdout, "serving until Ctrl-C"), LINE_WAIT_S)
        metrics = re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", "".join(lines))
        assert metrics is not None, lines
        async with aiohttp.ClientSession() as s, s.get(metrics.group(1)) as r:
            assert r.status == 200 and "together_meter_requests_total" in await r.text()
        proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stdout.read(), LINE_WAIT_S)
        assert await asyncio.wait_for(proc.wait(), LINE_WAIT_S) == 0
        assert b"stopped: the proxy and the simulator are down" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert os.listdir(tmp_path) == []


async def _lines_until(stream: asyncio.StreamReader, marker: str) -> list[str]:
    """Lines read until one holds `marker` (the caller bounds the wait)."""
    lines: list[str] = []
    started = time.monotonic()
    while not lines or marker not in lines[-1]:
        line = (await stream.readline()).decode()
        assert line, f"demo ended after {time.monotonic() - started:.1f} s: {lines}"
        lines.append(line)
    return lines


def test_preflight_names_the_missing_sdk_and_a_used_keep_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the openai SDK the demo says which extra to install; a file as --keep is refused."""
    (tmp_path / "file").write_text("x")
    assert demo.preflight(None) is None and demo.preflight(str(tmp_path / "new")) is None
    assert "not an empty directory" in (demo.preflight(str(tmp_path / "file")) or "")
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    assert "pip install openai" in (demo.preflight(None) or "") and "[demo]" in (demo.preflight(None) or "")
