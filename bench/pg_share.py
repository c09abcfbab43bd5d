"""Where the co-located PostgreSQL's work lands: the proxy's core or the harness's.

Starts the fake upstream (../shared/bench/fake_together.py) on core 0, one proxy on the
PostgreSQL ledger (a fresh database, dropped at the end) and one on the SQLite ledger, both on
core 1 as in ../shared/bench, then runs loadgen.py against each in turn (interleaved, REPS
times) and reports per run: req/s, the proxy's CPU, the PostgreSQL server's CPU (all its
processes), the proxy's involuntary context switches (it was preempted), and on which core the
PostgreSQL backend of the ledger writer was when it was seen running (sampled every ms).

  ~/.cache/meter-bench/venv/bin/python bench/pg_share.py --reps 3 --concurrency 32
  ... --pg-cpus 0      # also pin every PostgreSQL process to core 0 for the run (restored after)

Needs the harness venv (bash ../shared/bench/setup_env.sh) for loadgen/fake upstream, this
checkout's .venv for the proxy, and the local PostgreSQL. Loopback only; every run is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

Popen = subprocess.Popen[bytes]

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench"))
PG_ADMIN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
UPSTREAM_PORT, PG_PORT, SQ_PORT = 18020, 18320, 18321


def psql(sql: str, dsn: str = PG_ADMIN) -> str:
    return subprocess.run(["psql", dsn, "-Atqc", sql], check=True, capture_output=True, text=True).stdout


def ticks(pid: int) -> int:
    """user + system CPU of one process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def postgres_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def pg_ticks() -> int:
    total = 0
    for pid in postgres_pids():
        with contextlib.suppress(OSError):  # a backend that ended meanwhile
            total += ticks(pid)
    return total


def involuntary(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("nonvoluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total


def sample_cores(pid: int, stop: threading.Event, seen: dict[str, int]) -> None:
    """Count, every ms, the core a running (state R) process is on."""
    path = f"/proc/{pid}/stat"
    while not stop.is_set():
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return
        if fields[0] == "R":
            seen[fields[36]] = seen.get(fields[36], 0) + 1
        time.sleep(0.001)


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(150):
        if proc.poll() is not None:
            raise SystemExit(f"the process for admin port {port} exited: see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"admin port {port} never became ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--mode", choices=("nonstream", "stream"), default="nonstream")
    p.add_argument("--pg-cpus", help="pin every PostgreSQL process to these cores for the run")
    p.add_argument(
        "--sqlite-synchronous",
        choices=("normal", "full"),
        default="normal",
        help="the SQLite proxy's ledger.synchronous (full: each commit fsyncs, as PostgreSQL's do)",
    )
    p.add_argument("--out", type=Path, help="also write the table and the raw lines here")
    args = p.parse_args()

    harness_py = Path(os.environ.get("PY", Path.home() / ".cache/meter-bench/venv/bin/python"))
    meter_py = ROOT / ".venv" / "bin" / "python"
    db = f"tm_share_{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="pg-share-"))
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    ncpu = os.cpu_count() or 1

    os.sched_setaffinity(0, {0})  # this script and its sampler stay off the proxies' core

    def start(cmd: list[str], cpus: str, log: str, env: dict[str, str] | None = None) -> Popen:
        fh = open(work / log, "wb")  # noqa: SIM115 - closed at the end
        logs.append(fh)
        proc = subprocess.Popen(["taskset", "-c", cpus, *cmd], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})  # fmt: skip
        procs.append(proc)
        return proc

    psql(f"CREATE DATABASE {db}")
    if args.pg_cpus:
        for pid in postgres_pids():
            subprocess.run(["taskset", "-a", "-p", "-c", args.pg_cpus, str(pid)], capture_output=True)
    rows: list[dict[str, object]] = []
    try:
        start([str(harness_py), str(SHARED / "fake_together.py"), "--port", str(UPSTREAM_PORT),
               "--chunks", "20", "--chunk-delay-ms", "1"], "0", "upstream.log")  # fmt: skip
        serve = [str(meter_py), "-m", "proxy.cli", "--log-level", "WARNING", "serve",
                 "--upstream", f"http://127.0.0.1:{UPSTREAM_PORT}/v1"]  # fmt: skip
        env = {"TOGETHER_API_KEY": "fake-together-key", "PYTHONPATH": str(ROOT),
               "TM_BENCH_DSN": PG_ADMIN.rsplit("/", 1)[0] + f"/{db}"}  # fmt: skip
        pg = start([*serve, "--config", str(ROOT / "bench/config-postgres.yaml"), "--port", str(PG_PORT),
                    "--admin-port", str(PG_PORT + 1000)], "1", "pg.log", env)  # fmt: skip
        sq_config = work / "config-sqlite.yaml"
        sq_config.write_text(
            (ROOT / "bench/config.yaml")
            .read_text()
            .replace("ledger: {path: bench-ledger.db}", f"ledger: {{synchronous: {args.sqlite_synchronous}}}")
            .replace("prices: ../config/prices.yaml", f"prices: {ROOT / 'config/prices.yaml'}")
        )
        sq = start([*serve, "--config", str(sq_config), "--port", str(SQ_PORT),
                    "--admin-port", str(SQ_PORT + 1000), "--ledger", str(work / "ledger.db")],
                   "1", "sqlite.log", env)  # fmt: skip
        wait_ready(PG_PORT + 1000, pg)
        wait_ready(SQ_PORT + 1000, sq)
        targets = (("postgres", pg, PG_PORT), ("sqlite", sq, SQ_PORT))
        for rep in range(args.reps):
            for name, proc, port in targets[:: 1 if rep % 2 == 0 else -1]:  # alternate the order
                out = work / f"{name}-{rep}.json"
                stop, seen = threading.Event(), {}
                cs0, pg0 = involuntary(proc.pid), pg_ticks()
                lg = subprocess.Popen(
                    ["taskset", "-c", "0", str(harness_py), str(SHARED / "loadgen.py"),
                     f"http://127.0.0.1:{port}/v1", "--mode", args.mode, "-c", str(args.concurrency),
                     "-d", str(args.duration), "--warmup", "2", "--auth", "sk-bench-tenant-a",
                     "--pids", f"proxy={proc.pid}", "--json-out", str(out), "--quiet"],
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(2)  # the warm-up; the writer's connection is open by now
                t0 = time.monotonic()
                writer = psql(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = "
                    f"'together-meter-writer' AND datname = '{db}'"
                ).split()
                if name == "postgres" and writer:
                    args_ = (int(writer[0]), stop, seen)
                    threading.Thread(target=sample_cores, args=args_, daemon=True).start()
                lg.wait(timeout=args.duration + 30)
                stop.set()
                elapsed = time.monotonic() - t0
                cs, pgt = involuntary(proc.pid) - cs0, pg_ticks() - pg0
                r = json.loads(out.read_text().splitlines()[-1])
                row = {
                    "rep": rep + 1,
                    "target": name,
                    "rps": round(r.get("rps", 0.0)),
                    "proxy_cpu_pct": round(r.get("procs", {}).get("proxy", {}).get("cpu_pct", 0.0), 1),
                    "pg_cpu_pct": round(100 * pgt / os.sysconf("SC_CLK_TCK") / (elapsed + 2), 1),
                    "proxy_preempted_per_s": round(cs / (elapsed + 2)),
                    "writer_backend_seen_on": {f"core {k}": v for k, v in sorted(seen.items())},
                    "errors": r.get("errors", 0),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for fh in logs:
            fh.close()
        if args.pg_cpus:
            for pid in postgres_pids():
                subprocess.run(["taskset", "-a", "-p", "-c", f"0-{ncpu - 1}", str(pid)], capture_output=True)
        drop = f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        subprocess.run(["psql", PG_ADMIN, "-qc", drop], capture_output=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for f in work.glob("*.log"):
                shutil.copy(f, args.out / f.name)
        shutil.rmtree(work, ignore_errors=True)
    table = [
        "| rep | target | req/s | proxy CPU % | PostgreSQL CPU % | proxy preempted /s "
        "| writer backend seen running on |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seen_on: dict[str, int] = r["writer_backend_seen_on"]  # type: ignore[assignment]
        where = ", ".join(f"{k}: {v}" for k, v in seen_on.items()) or "-"
        table.append(
            f"| {r['rep']} | {r['target']} | {r['rps']:,} | {r['proxy_cpu_pct']} | {r['pg_cpu_pct']} | "
            f"{r['proxy_preempted_per_s']:,} | {where} |"
        )
    text = "\n".join(table)
    print(text)
    if args.out:
        (args.out / "share.md").write_text(text + "\n")
        (args.out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
