"""Ledger write-path throughput: rows/s through the real group-committing writer, per backend.

Each simulated request does what the relay does: `begin` (commit the in_flight row) then `finish`
(make it terminal), awaiting each commit. C concurrent "requests" loop until N requests are
done; we report requests/s, row writes/s, the latency of one awaited commit, and the CPU time
per request of this process and (PostgreSQL) of the database's backends serving it, which a
busy shared machine disturbs less than wall-clock rates.

  .venv/bin/python bench/ledger_write.py --backend sqlite --concurrency 1 64 --requests 20000
  .venv/bin/python bench/ledger_write.py --backend postgres --dsn postgresql://postgres@127.0.0.1/DB ...
  .venv/bin/python bench/ledger_write.py --root /tmp/old-checkout ...   # that checkout's ledger

Loopback / local files only; every run is bounded by --requests and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "--root" in sys.argv:  # measure another checkout's ledger (an A/B against an older commit)
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from proxy.config import LedgerSettings  # noqa: E402
from proxy.ledger import LedgerRow, now_us, period_of  # noqa: E402


def open_ledger(backend: str, dsn: str | None, workdir: Path) -> Any:
    from dataclasses import fields

    names = {f.name for f in fields(LedgerSettings)}
    if backend == "sqlite":
        settings = LedgerSettings(backend="sqlite", path=str(workdir / "ledger.db"))
    else:
        extra = {"dsn": dsn} if "dsn" in names else {}
        settings = LedgerSettings(backend="postgres", **extra)  # type: ignore[arg-type]
    try:
        from proxy.ledger.factory import open_ledger as factory  # type: ignore[import-not-found]
    except ImportError:
        from proxy.ledger.sqlite import SQLiteLedger

        if backend != "sqlite":
            raise SystemExit("this checkout has no PostgreSQL ledger") from None
        return SQLiteLedger(settings.path)
    return factory(settings)


async def one_run(
    backend: str, dsn: str | None, concurrency: int, requests: int, max_seconds: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        ledger = open_ledger(backend, dsn, Path(tmp))
        await ledger.open()
        latencies: list[float] = []
        done = 0
        counter = iter(range(requests))
        deadline = time.perf_counter() + max_seconds
        run_id = f"{backend}{concurrency}_{time.time_ns()}"

        async def worker() -> None:
            nonlocal done
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                started = now_us()
                row = LedgerRow(
                    f"req_{run_id}_{i}",
                    "acme",
                    "k1",
                    "deepseek-ai/DeepSeek-V3",
                    "chat",
                    "serverless",
                    "search",
                    "prod",
                    False,
                    started,
                    period_of(started),
                    reserved_pusd=6_000_000_000,
                )
                t0 = time.perf_counter()
                await ledger.begin(row)
                t1 = time.perf_counter()
                made = await ledger.finish(
                    row.terminal("ok", upstream_status=200, prompt_tokens=3000, completion_tokens=1000,
                                 usage_source="upstream", cost_pusd=6_000_000_000)
                )  # fmt: skip
                t2 = time.perf_counter()
                assert made, "finish must make the row terminal exactly once"
                latencies.append(t1 - t0)
                latencies.append(t2 - t1)
                done += 1

        t_start, cpu_start = time.perf_counter(), time.process_time()
        db_start = await _db_cpu(dsn) if backend == "postgres" else {}
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
        db_cpu = (
            sum(v - db_start.get(k, 0.0) for k, v in (await _db_cpu(dsn)).items())
            if backend == "postgres"
            else 0
        )
        await ledger.close()
    latencies.sort()
    return {
        "backend": backend,
        "concurrency": concurrency,
        "requests": done,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(done / elapsed),
        "row_writes_per_s": round(2 * done / elapsed),
        "commit_wait_p50_ms": round(statistics.median(latencies) * 1000, 3),
        "commit_wait_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "proxy_cpu_us_per_request": round(cpu / done * 1e6, 1),
        "db_cpu_us_per_request": round(db_cpu / done * 1e6, 1),
        "proxy_package": str(Path(sys.modules["proxy"].__file__ or "").parent),  # the code measured
    }


async def _db_cpu(dsn: str | None) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to the benchmark's database."""
    import os

    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        pids = [r[0] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )]  # fmt: skip
    finally:
        await conn.close()
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # noqa: ASYNC240
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--dsn", help="PostgreSQL DSN (a database the benchmark may write to)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--requests", type=int, default=20_000, help="requests per run (2 row writes each)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="upper bound of one run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--root", help="the checkout whose ledger to measure (default: this one)")
    args = p.parse_args()
    results = []
    for c in args.concurrency:
        for _ in range(args.reps):
            r = asyncio.run(one_run(args.backend, args.dsn, c, args.requests, args.max_seconds))
            results.append(r)
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
