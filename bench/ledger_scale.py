"""A month of traffic in the ledger: reports, start-up and the proxy's latency at 1M / 10M rows.

  .venv/bin/python bench/ledger_scale.py --rows 1000000 --backend sqlite postgres --out bench/results/scale-1m
  .venv/bin/python bench/ledger_scale.py --rows 1000000 --backend postgres --period 2026-11 --prune \
      --db tm_scale_mine --out bench/results/scale-1m-prune   # a past month, then `db prune` it

1. Writes a synthetic month in the `db export` format (JSON Lines): the current period, rows
   spread over all its days, 20 tenants using 2-3 models and features each, three endpoints,
   95 % ok and the other statuses, 3 % estimated usage, 2 % batch rows.
2. Loads it into each backend with `together-meter db import` (the product's import path, in one
   transaction: rows, rollups and budget accounts), timing it.
3. Measures: bytes per row; `together-meter report --month` (wall time of the command, median of
   3); `serve` ready time (spawn to /readyz 200); GET /admin/report and /admin/chargeback on the
   running proxy (median of 5); a sequential probe of small chat requests through the proxy,
   first alone, then while reports run back to back: the worst probe latency minus the median
   alone is the extra wait a report causes.
4. With --prune (the month must be before the current one): `together-meter db prune --before`
   the month after it, timed; then the reports again (they must be equal) and the rows left.

Loopback only: the proxy's upstream is the built-in simulator; PostgreSQL on 127.0.0.1:5432
(a database tm_scale_<rows>, or --db, is created and dropped). Every wait and loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.core.budgets import Periods  # noqa: E402
from proxy.core.records import LedgerRow, now_us  # noqa: E402
from proxy.core.retention import export_record  # noqa: E402

PY = sys.executable
KEY = "sk-bench-tenant-a"  # bench/config.yaml's tenant key (sha256 below); loopback only
KEY_SHA = "8f7f346c5bccafc696890a1b35f54168208cc3c04fd70554b34064f16c520aec"
ADMIN_TOKEN = "bench-admin-token"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
MODELS = [
    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "deepseek-ai/DeepSeek-V3",
    "arcee-ai/maestro-reasoning",
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
    "Qwen/Qwen2.5-72B-Instruct-Turbo",
    "mistralai/Mixtral-8x7B-Instruct-v0.1",
]
FEATURES = ["search", "chat", "summarize", "extract", "agent", None]
STATUSES = ["ok"] * 950 + ["client_aborted"] * 20 + ["upstream_error"] * 10 + ["rejected"] * 10
STATUSES += ["upstream_timeout"] * 5 + ["orphaned"] * 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- 1. the synthetic month -------------------------------------------------------------------


def synthetic_rows(n: int, period: str, periods: Periods, seed: int = 16) -> Any:
    """`n` terminal rows of `period`, oldest first, ids unique (req_ + 13 hex µs + counter)."""
    rnd = random.Random(seed)
    start, end = (int(x * 1_000_000) for x in periods.bounds(period))
    step = (end - start) / n
    tenants = [
        (f"tenant-{t:02d}", rnd.sample(MODELS, 2 + t % 2), rnd.sample(FEATURES, 2), ("prod", "dev"))
        for t in range(20)
    ]
    for i in range(n):
        name, models, features, envs = tenants[rnd.randrange(20) if i % 3 else i % 20]
        started = start + int(i * step)
        status = STATUSES[rnd.randrange(len(STATUSES))]
        endpoint = "chat" if i % 10 < 8 else ("completions" if i % 10 == 8 else "embeddings")
        prompt, completion = (
            200 + rnd.randrange(3000),
            (0 if endpoint == "embeddings" else rnd.randrange(800)),
        )
        usage = status not in ("rejected", "upstream_error", "upstream_timeout", "orphaned")
        cost = (prompt * 880_000 + completion * 880_000) if status != "upstream_error" else 0
        yield LedgerRow(
            f"req_{started:013x}{i:012x}", name, "k1", rnd.choice(models), endpoint,
            "batch" if i % 50 == 0 else "serverless", rnd.choice(features), envs[i % 7 == 0], i % 3 == 0,
            started, period, status, started + 400_000 + rnd.randrange(2_000_000), 200 if usage else None,
            prompt if usage else None, completion if usage else None,
            (prompt // 4) if i % 5 == 0 and usage else None,
            None, "estimated" if (i % 33 == 0 or status == "orphaned") else ("upstream" if usage else "none"),
            0 if status == "rejected" else cost, 6_000_000_000, usage, None, None,
        )  # fmt: skip


def write_month(path: Path, n: int, period: str, periods: Periods) -> float:
    t0 = time.perf_counter()
    with path.open("wb") as f:
        for row in synthetic_rows(n, period, periods):
            f.write(orjson.dumps(export_record(row)) + b"\n")
    return time.perf_counter() - t0


# -- 2. the ledger and the proxy ----------------------------------------------------------------


def write_config(workdir: Path, backend: str, dsn: str | None) -> Path:
    ledger = (
        f"{{backend: postgres, dsn: '{dsn}'}}"
        if backend == "postgres"
        else f"{{path: {workdir / 'ledger.db'}}}"
    )
    text = f"""listen: {{host: 127.0.0.1, port: {free_port()}}}
admin: {{host: 127.0.0.1, port: {free_port()}}}
upstream: {{url: "http://127.0.0.1:18000/v1"}}
ledger: {ledger}
prices: {ROOT / "config" / "prices.yaml"}
admin_token_env: TM_SCALE_ADMIN_TOKEN
tenants:
  bench:
    keys_sha256: [{KEY_SHA}]
dedicated_endpoints:
  shared-70b: {{model: "meta-llama/Llama-3.3-70B-Instruct-Turbo", monthly_usd: 2000}}
"""
    path = workdir / f"{backend}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 3600) -> tuple[float, str]:
    """Run `together-meter ARGS`; (wall seconds, stderr). Raises on a non-zero exit."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [PY, "-m", "proxy.cli", "--log-level", "WARNING", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"together-meter {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return took, done.stderr


def db_import(month: Path, config: Path, env: dict[str, str]) -> tuple[float, str]:
    """`together-meter db import MONTH --config CONFIG`; before main.py has the subcommand, the
    same function (proxy.cli.db.run_import) called directly."""
    probe = subprocess.run([PY, "-m", "proxy.cli", "db", "import", "--help"], cwd=ROOT, capture_output=True)
    if probe.returncode == 0:
        return cli("db", "import", str(month), "--config", str(config), env=env)
    code = (
        "import sys; from proxy.config import load_config; from proxy.cli.db import run_import; "
        "sys.exit(run_import(load_config(sys.argv[1]), None, sys.argv[2]))"
    )
    t0 = time.perf_counter()
    done = subprocess.run([PY, "-c", code, str(config), str(month)], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=7200, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"db import exited {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stderr


async def bytes_per_row(backend: str, workdir: Path, dsn: str | None, rows: int) -> dict[str, Any]:
    if backend == "sqlite":
        import sqlite3

        db = workdir / "ledger.db"
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        lines = conn.execute("SELECT COUNT(*) FROM rollups").fetchone()[0]
        conn.close()
        size = db.stat().st_size
        return {"bytes_total": size, "bytes_per_row": round(size / rows, 1), "rollup_lines": lines}
    assert dsn is not None
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE")
        req = await conn.fetchval(  # a partitioned table (migration 0006) is the sum of its months
            "SELECT pg_total_relation_size('requests') + COALESCE((SELECT SUM(pg_total_relation_size("
            "inhrelid)) FROM pg_inherits WHERE inhparent = 'requests'::regclass), 0)"
        )
        roll = await conn.fetchval("SELECT pg_total_relation_size('rollups')")
        lines = await conn.fetchval("SELECT COUNT(*) FROM rollups")
        total = await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()
    return {
        "bytes_total": total,
        "bytes_per_row": round(total / rows, 1),
        "requests_bytes_per_row": round(int(req) / rows, 1),
        "rollups_bytes": roll,
        "rollup_lines": lines,
    }


def start_simulator(port: int) -> subprocess.Popen[bytes]:
    """The built-in together.ai simulator on a loopback port (the proxy's upstream)."""
    out = subprocess.DEVNULL
    return subprocess.Popen(
        [PY, "-m", "proxy.simulator", "--port", str(port)], cwd=ROOT, stdout=out, stderr=out
    )


class Served:
    """`together-meter serve` on the ledger, in front of the simulator."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.config, self.env, self.log = config, env, log
        text = config.read_text()
        self.port = int(text.split("listen: {host: 127.0.0.1, port: ")[1].split("}")[0])
        self.admin_port = int(text.split("admin: {host: 127.0.0.1, port: ")[1].split("}")[0])
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, upstream: str, within: float = 120.0) -> float:
        """Spawn it; seconds until /readyz answers 200."""
        t0 = time.perf_counter()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 (a benchmark: nothing else runs meanwhile)
                [PY, "-m", "proxy.cli", "--log-level", "WARNING", "serve", "--config", str(self.config),
                 "--upstream", upstream],
                cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=log,
            )  # fmt: skip
        async with aiohttp.ClientSession() as s:
            while time.perf_counter() - t0 < within:
                assert self.proc.poll() is None, f"serve exited: {self.log.read_text()[-2000:]}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r:
                        if r.status == 200:
                            return time.perf_counter() - t0
                await asyncio.sleep(0.01)
        raise SystemExit(f"serve not ready within {within} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def admin_times(served: Served, paths: list[str], reps: int) -> dict[str, float]:
    """Median seconds of each admin GET over `reps` runs."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as s:
        for path in paths:
            took = []
            for _ in range(reps):
                t0 = time.perf_counter()
                async with s.get(f"http://127.0.0.1:{served.admin_port}{path}", headers=auth) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                took.append(time.perf_counter() - t0)
            out[path] = round(statistics.median(took), 4)
    return out


async def probe(served: Served, seconds: float, while_reports: bool) -> list[float]:
    """Sequential small chat requests for `seconds`; with `while_reports`, the admin reports run
    back to back meanwhile. Each request's latency."""
    body = orjson.dumps(
        {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    waits: list[float] = []
    stop = asyncio.Event()

    async def reports() -> int:
        n = 0
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        paths = [
            "/admin/report?by=model",
            "/admin/report?by=day",
            "/admin/chargeback",
            "/admin/report?by=tenant",
        ]
        async with aiohttp.ClientSession() as s:
            while not stop.is_set() and n < 100_000:
                async with s.get(f"http://127.0.0.1:{served.admin_port}{paths[n % 4]}", headers=auth) as r:
                    await r.read()
                n += 1
        return n

    task = asyncio.create_task(reports()) if while_reports else None
    url = f"http://127.0.0.1:{served.port}/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and len(waits) < 1_000_000:
            t0 = time.perf_counter()
            async with s.post(url, data=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                await r.read()
            waits.append(time.perf_counter() - t0)
    stop.set()
    if task is not None:
        print(f"    reports run meanwhile: {await task}", flush=True)
    return waits


def summary(waits: list[float]) -> dict[str, float]:
    w = sorted(waits)
    return {
        "n": len(w),
        "p50_ms": round(statistics.median(w) * 1000, 3),
        "p99_ms": round(w[int(len(w) * 0.99)] * 1000, 3),
        "max_ms": round(w[-1] * 1000, 3),
    }


# -- 3. one backend -----------------------------------------------------------------------------


async def run_backend(
    backend: str, month: Path, rows: int, period: str, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    dsn = None
    database = args.db or f"tm_scale_{rows}"
    if backend == "postgres":
        dsn = f"postgresql://postgres@127.0.0.1:5432/{database}"
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {database}")
        await admin.close()
    config = write_config(workdir, backend, dsn)
    env = {"TOGETHER_API_KEY": "sk-upstream-bench", "TM_SCALE_ADMIN_TOKEN": ADMIN_TOKEN}
    result: dict[str, Any] = {"backend": backend, "rows": rows, "period": period}
    print(f"[{backend}] db import ...", flush=True)
    took, err = db_import(month, config, env)
    result["import_s"] = round(took, 1)
    result["import_rows_per_s"] = round(rows / took)
    result["import_line"] = err.strip().splitlines()[-1]
    result.update(await bytes_per_row(backend, workdir, dsn, rows))
    print(f"[{backend}] report --month ...", flush=True)
    report = []
    for by in ("model", "day"):
        for _ in range(3):
            took, _ = cli(
                "report", "--config", str(config), "--month", period, "--by", by, "--format", "json", env=env
            )
            report.append((by, took))
    result["report_s"] = {
        by: round(statistics.median(t for b, t in report if b == by), 3) for by in ("model", "day")
    }
    took, _ = cli(
        "report", "--config", str(config), "--month", period, "--chargeback", "--format", "json", env=env
    )
    result["report_chargeback_s"] = round(took, 3)
    sim_port = free_port()
    sim = start_simulator(sim_port)
    served = Served(config, env, workdir / f"{backend}-serve.log")
    try:
        await asyncio.sleep(1.0)
        ready = []
        for _ in range(3):
            ready.append(await served.start(f"http://127.0.0.1:{sim_port}/v1"))
            served.stop()
        result["serve_ready_s"] = [round(x, 3) for x in ready]
        await served.start(f"http://127.0.0.1:{sim_port}/v1")
        paths = [f"/admin/report?month={period}&by={by}" for by in ("model", "tenant", "day")]
        paths += [f"/admin/chargeback?month={period}", "/admin/tenants/bench/usage", "/admin/spend"]
        result["admin_s"] = await admin_times(served, paths, reps=5)
        print(f"[{backend}] probe ...", flush=True)
        await probe(served, 3.0, False)  # warm-up
        alone = summary(await probe(served, 10.0, False))
        during = summary(await probe(served, 10.0, True))
        result["probe_alone"], result["probe_during_reports"] = alone, during
        result["probe_worst_extra_ms"] = round(during["max_ms"] - alone["p50_ms"], 3)
    finally:
        served.stop()
        sim.terminate()
        sim.wait(10)
    if args.prune:
        result.update(prune_month(config, env, period))
    if backend == "postgres":
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await admin.close()
    return result


def prune_month(config: Path, env: dict[str, str], period: str) -> dict[str, Any]:
    """`db prune --before` the month after `period`, timed; the reports must not change."""
    year, mon = (int(x) for x in period.split("-"))
    after = f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"

    def run(*args: str) -> str:
        done = subprocess.run([PY, "-m", "proxy.cli", "--log-level", "WARNING", *args], cwd=ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=7200,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"together-meter {args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    reports = [("report", "--config", str(config), "--month", period, "--by", by, "--format", "json")
               for by in ("model", "day", "tenant")]  # fmt: skip
    before = [json.loads(run(*r)) for r in reports]
    print(f"db prune --before {after} ...", flush=True)
    t0 = time.perf_counter()
    line = run("db", "prune", "--config", str(config), "--before", after).strip()
    took = time.perf_counter() - t0
    if [json.loads(run(*r)) for r in reports] != before:
        raise SystemExit("the reports changed after db prune")
    _, left = cli("db", "export", "--config", str(config), "--month", period, "-o", os.devnull, env=env)
    return {"prune_s": round(took, 2), "prune_line": line, "reports_equal_after_prune": True,
            "rows_left_after_prune": left.strip()}  # fmt: skip


async def main_async(args: argparse.Namespace) -> int:
    periods = Periods("UTC")
    period = args.period or periods.of(now_us())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    with tempfile.TemporaryDirectory(prefix="ledger-scale-", dir=args.workdir) as tmp:
        work = Path(tmp)
        month = work / "month.jsonl"
        print(f"writing {args.rows:,} rows of {period} to {month} ...", flush=True)
        took = write_month(month, args.rows, period, periods)
        meta = {
            "rows": args.rows,
            "period": period,
            "generate_s": round(took, 1),
            "jsonl_bytes": month.stat().st_size,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        for backend in args.backend:
            (work / backend).mkdir()
            result = await run_backend(backend, month, args.rows, period, work / backend, args)
            print(json.dumps(result), flush=True)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--backend", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"])
    p.add_argument("--period", help="the month to fill (default: the current one, UTC)")
    p.add_argument("--out", default="bench/results/ledger-scale")
    p.add_argument("--workdir", help="where the month file and the SQLite ledger go (default: /tmp)")
    p.add_argument("--db", help="PostgreSQL database to create and drop (default: tm_scale_<rows>)")
    p.add_argument("--prune", action="store_true", help="then `db prune` the month (a past --period)")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
