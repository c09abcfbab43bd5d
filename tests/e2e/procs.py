"""The real proxy as a subprocess (`python -m proxy.cli serve`) for crash and shutdown tests.

`ProxyProcess` starts, SIGKILLs, SIGTERMs and restarts it on one ledger file; `stream_chat` is a
raw aiohttp streaming client that notes what it saw; `ledger_rows` reads the SQLite file directly.
Everything is loopback and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.auth import digest, new_key
from proxy.core.budgets import Periods
from proxy.core.records import LedgerRow
from proxy.core.rollups import rollup_rows
from proxy.ledger.rollup_sql import KEY_SQL, to_rollup

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_KEY = "sk-operator-canary-proc-41c2"
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
READY_WITHIN_S = 20.0


def free_port() -> int:
    """A loopback port free right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, *, drain_timeout: float = 3) -> tuple[Path, str]:
    """config/example.yaml + prices.yaml copied to `directory`, acme given a fresh key."""
    key = new_key()
    text = (ROOT / "config" / "example.yaml").read_text()
    for old, new in (
        (
            "    description: Acme Corp, all models\n",
            f"    description: Acme\n    keys_sha256: [{digest(key)}]\n",
        ),
        ("  drain_timeout: 30\n", f"  drain_timeout: {drain_timeout}\n"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "example.yaml"
    path.write_text(text)
    (directory / "prices.yaml").write_text((ROOT / "config" / "prices.yaml").read_text())
    return path, key


@dataclass
class ProxyProcess:
    """One proxy subprocess at a time on fixed ports and one ledger; `kill()` in a finally."""

    config: Path
    ledger: Path
    upstream: str
    log: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self) -> None:
        """Spawn `together-meter serve` and wait (bounded) until /readyz says 200."""
        assert self.proc is None or self.proc.returncode is not None
        self.starts += 1
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
                "--config",
                str(self.config),
                "--upstream",
                self.upstream,
                "--port",
                str(self.port),
                "--admin-port",
                str(self.admin_port),
                "--ledger",
                str(self.ledger),
                cwd=ROOT,
                env={**os.environ, "TOGETHER_API_KEY": OPERATOR_KEY},
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + READY_WITHIN_S
        async with aiohttp.ClientSession() as s:
            while True:
                assert self.proc.returncode is None, f"proxy exited {self.proc.returncode}: {self.tail()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(self.admin + "/readyz") as r:
                        if r.status == 200:
                            return
                assert time.monotonic() < deadline, f"proxy not ready in {READY_WITHIN_S} s: {self.tail()}"
                await asyncio.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.returncode is None
        self.proc.send_signal(sig)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    async def kill(self) -> None:
        """SIGKILL (if still running) and reap; safe to call at any time."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def gauges(self) -> dict[tuple[str, str], float]:
        """(metric sample name, tenant) -> value for the budget gauges on /metrics."""
        async with aiohttp.ClientSession() as s, s.get(self.admin + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if "tenant" in sample.labels and len(sample.labels) == 1:
                    out[(sample.name, sample.labels["tenant"])] = sample.value
        return out


@dataclass
class Outcome:
    """What one streaming client saw."""

    completion_tokens: int  # what it asked the simulator to generate
    status: int | None = None
    request_id: str | None = None
    body: bytes = b""
    started: bool = False  # response headers arrived
    error: str | None = None

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.body

    @property
    def events(self) -> list[bytes]:
        return [line[5:].strip() for line in self.body.split(b"\n") if line.startswith(b"data:")]


async def stream_chat(
    session: aiohttp.ClientSession, url: str, key: str, out: Outcome, chunk_delay_ms: float
) -> Outcome:
    """One streaming chat completion through the proxy; never raises on a cut connection."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "count for me"}],
        "stream": True,
        "max_tokens": 512,
        "simulate": {"completion_tokens": out.completion_tokens, "chunk_delay_ms": chunk_delay_ms},
    }
    try:
        async with asyncio.timeout(30):
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                out.status, out.request_id, out.started = r.status, r.headers.get("x-request-id"), True
                async for chunk in r.content.iter_any():
                    out.body += chunk
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        out.error = type(exc).__name__
    return out


def ledger_rows(path: Path) -> dict[str, dict[str, Any]]:
    """request_id -> row, read straight from the SQLite file (WAL readers do not block)."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: dict(r) for r in conn.execute("SELECT * FROM requests")}
    finally:
        conn.close()


def rollups_match_rows(path: Path, periods: Periods) -> bool:
    """The rollups table read straight from the file equals the GROUP BY of its terminal rows."""
    rows = [LedgerRow.from_mapping(r) for r in ledger_rows(path).values()]
    conn = sqlite3.connect(path)
    try:
        found = conn.execute(f"SELECT * FROM rollups ORDER BY {KEY_SQL}").fetchall()
    finally:
        conn.close()
    return [to_rollup(r) for r in found] == rollup_rows(rows, periods)


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()
