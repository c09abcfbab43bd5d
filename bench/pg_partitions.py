"""PostgreSQL monthly partitions (migration 0006) at scale: conversion, prune, import.

  git archive 2e6bac9 | tar -x -C /tmp/before     # the code before partitions
  .venv/bin/python bench/pg_partitions.py --rows 1000000 --old /tmp/before --export \\
      --import-rows 200000 --out bench/results/pg-partitions

1. A month (2026-11) of --rows rows is written straight into a ledger at the last schema before
   0006 with SQL, and its rollups made by migration 0003: minutes for 10 million
   rows where `db import` takes an hour on the 2-core test machine. That database is the
   template of two copies.
2. Old copy, the code of --old: `report --month`, `db prune --before 2026-12` (rows deleted),
   the report again (it must be equal), the database's size.
3. New copy, this checkout: `db migrate` (0006 converts the table; with --export, `db export`
   before and after must be equal byte for byte), then the same report, prune, report, size.
4. With --import-rows M: `db import` of M synthetic rows of 2026-06 (bench/ledger_scale.py's
   month) into a fresh ledger with the old code, a fresh ledger with this one, and a ledger of
   this one holding 12 past months of 20,000 rows each, 14 partitions with this month's and the
   next (what the per-row id check costs per month kept).

  .venv/bin/python bench/pg_partitions.py --months-db tm_part_w14   # only such a ledger, for
  .venv/bin/python bench/ledger_write.py --backend postgres --dsn postgresql://postgres@127.0.0.1/tm_part_w14

Every command is timed as a whole (Python start included, about 0.3 s). PostgreSQL on
127.0.0.1:5432; databases tm_part_<tag>_* are created and dropped. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ledger_scale import synthetic_rows  # noqa: E402

from proxy.core.budgets import Periods  # noqa: E402
from proxy.core.retention import export_record  # noqa: E402
from proxy.ledger import pg_partitions  # noqa: E402
from proxy.ledger.migrate import MIGRATIONS_DIR, available, migrate  # noqa: E402
from proxy.ledger.pg_store import PostgresStore  # noqa: E402

PY = sys.executable
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
KEY_SHA = "8f7f346c5bccafc696890a1b35f54168208cc3c04fd70554b34064f16c520aec"  # bench/config.yaml's
# a month of rows like ledger_scale.py's, in SQL: 20 tenants, 3 models, 2 % batch, 1 % aborted
MONTH_SQL = """INSERT INTO requests (request_id, tenant, key_id, model, endpoint, mode, feature,
    environment, stream, started_us, finished_us, period, upstream_status, prompt_tokens,
    completion_tokens, cached_tokens, usage_source, cost_pusd, reserved_pusd, status, stream_complete,
    upstream_id)
SELECT 'req_' || lpad(to_hex(t), 13, '0') || lpad(to_hex(i), 12, '0'), 'tenant-' || (i % 20), 'k1',
    (ARRAY['m/a', 'm/b', 'm/c'])[1 + i % 3], 'chat', CASE WHEN i % 50 = 0 THEN 'batch' ELSE 'serverless' END,
    CASE WHEN i % 3 = 0 THEN NULL ELSE 'search' END, 'prod', i % 2 = 0, t, t + 400000, $2::text, 200,
    200 + i % 3000, i % 800, CASE WHEN i % 5 = 0 THEN i % 100 END, 'upstream', (200 + i % 3000) * 880000,
    6000000000, CASE WHEN i % 100 = 0 THEN 'client_aborted' ELSE 'ok' END, true, 'up-' || i
FROM generate_series(1::bigint, $1::bigint) AS i,
    LATERAL (SELECT $3::bigint + i * ($4::bigint / $1::bigint) AS t) AS s"""  # $2: from $3, $4 µs long


def dsn(db: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{db}"


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fetchval(db: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn(db))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def config(workdir: Path, db: str) -> Path:
    path = workdir / f"{db}.yaml"
    prices = ROOT / "config" / "prices.yaml"
    path.write_text(f"ledger: {{backend: postgres, dsn: '{dsn(db)}'}}\nprices: {prices}\n"
                    f"tenants:\n  bench:\n    keys_sha256: [{KEY_SHA}]\n")  # fmt: skip
    return path


def cli(root: Path, cfg: Path, *args: str) -> tuple[float, str, str]:
    """`together-meter ARGS --config CFG` with the code of `root`: (seconds, stdout, stderr)."""
    t0 = time.perf_counter()
    done = subprocess.run([PY, "-m", "proxy.cli", "--log-level", "WARNING", *args, "--config", str(cfg)],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=7200, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{root}: together-meter {args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return round(time.perf_counter() - t0, 2), done.stdout.strip(), done.stderr.strip()


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


async def template(db: str, rows: int, workdir: Path) -> dict[str, Any]:
    """A ledger at the last schema before 0006 holding a month of `rows` rows and its rollups."""
    early, later = workdir / "early", workdir / "later"
    for d, keep in ((early, lambda v: v <= 2), (later, lambda v: v < 6)):
        d.mkdir()
        for m in available():
            if keep(m.version):
                shutil.copy(MIGRATIONS_DIR / f"{m.label}.sql", d)
    await admin(f"CREATE DATABASE {db}")
    conn = await asyncpg.connect(dsn(db))
    try:
        await migrate(conn, early)
        t0 = time.perf_counter()
        await conn.execute(MONTH_SQL, rows, *_month("2026-11"), timeout=7200)
        out: dict[str, Any] = {"rows": rows, "insert_s": round(time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        await migrate(conn, later)
        out["migration_0003_s"] = round(time.perf_counter() - t0, 1)
        await conn.execute("VACUUM ANALYZE", timeout=7200)
    finally:
        await conn.close()
    return out


async def one_side(root: Path, db: str, workdir: Path, new: bool, export: bool) -> dict[str, Any]:
    cfg = config(workdir, db)
    side: dict[str, Any] = {"code": str(root)}
    if new:
        if export:
            side["export_before_s"], _, _ = cli(root, cfg, "db", "export", "-o", str(workdir / "a.jsonl"))
        side["migrate_s"], side["migrate_out"], _ = cli(root, cfg, "db", "migrate")
        if export:
            side["export_after_s"], _, _ = cli(root, cfg, "db", "export", "-o", str(workdir / "b.jsonl"))
            side["export_bytes"] = (workdir / "a.jsonl").stat().st_size
            side["exports_equal"] = digest(workdir / "a.jsonl") == digest(workdir / "b.jsonl")
            (workdir / "a.jsonl").unlink()
            (workdir / "b.jsonl").unlink()
    side["bytes_before_prune"] = await fetchval(db, "SELECT pg_database_size(current_database())")
    report = ("report", "--month", "2026-11", "--by", "model", "--format", "json")
    side["report_s"], before, _ = cli(root, cfg, *report)
    side["prune_s"], side["prune_out"], _ = cli(root, cfg, "db", "prune", "--before", "2026-12")
    side["report_equal_after_prune"] = json.loads(cli(root, cfg, *report)[1]) == json.loads(before)
    side["rows_left"] = await fetchval(db, "SELECT COUNT(*) FROM requests")
    side["bytes_after_prune"] = await fetchval(db, "SELECT pg_database_size(current_database())")
    return side


async def months_ledger(db: str, months: int, per_month: int) -> None:
    """A ledger of this checkout holding `months` past months of `per_month` rows each (and this
    month's and the next's partitions, empty)."""
    await admin(f"CREATE DATABASE {db}")
    store = PostgresStore(dsn(db))
    try:
        await store.migrate()
    finally:
        await store.close()
    conn = await asyncpg.connect(dsn(db))
    try:
        periods = [f"{y:04d}-{m:02d}" for y, m in _months_back(2026, 11, months)]
        await pg_partitions.ensure(conn, periods)
        for period in periods:
            await conn.execute(MONTH_SQL, per_month, *_month(period), timeout=3600)
        await conn.execute("VACUUM ANALYZE", timeout=3600)
    finally:
        await conn.close()


def _month(period: str) -> tuple[str, int, int]:
    """(period, its first µs, its length in µs) in UTC."""
    start, end = Periods().bounds(period)
    return period, int(start * 1_000_000), int((end - start) * 1_000_000)


def _months_back(year: int, month: int, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        out.append((year, month))
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return out


async def imports(old: Path, rows: int, tag: str, workdir: Path) -> dict[str, Any]:
    month = workdir / "month.jsonl"
    with month.open("wb") as f:
        for r in synthetic_rows(rows, "2026-06", Periods()):
            f.write(orjson.dumps(export_record(r)) + b"\n")
    out: dict[str, Any] = {"rows": rows}
    for label, root in (("old_fresh", old), ("new_fresh", ROOT), ("new_14_partitions", ROOT)):
        db = f"tm_part_{tag}_imp"
        await admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        if label == "new_14_partitions":
            await months_ledger(db, 12, 20_000)  # 14 partitions
        else:
            await admin(f"CREATE DATABASE {db}")
        took, _, err = cli(root, config(workdir, db), "db", "import", str(month))
        out[label] = {"import_s": took, "line": err.splitlines()[-1]}
        print(json.dumps({label: out[label]}), flush=True)
        await admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    return out


async def main_async(args: argparse.Namespace, old: Path) -> int:
    tag = args.tag or f"{args.rows}"
    names = {k: f"tm_part_{tag}_{k}" for k in ("tpl", "old", "new")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    with tempfile.TemporaryDirectory(prefix="pg-partitions-") as tmp:
        workdir = Path(tmp)
        for db in names.values():
            await admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        try:
            print(f"a month of {args.rows:,} rows before 0006 ...", flush=True)
            result: dict[str, Any] = await template(names["tpl"], args.rows, workdir)
            result["requests_bytes"] = await fetchval(
                names["tpl"], "SELECT pg_total_relation_size('requests')"
            )
            for side, root in (("old", old), ("new", ROOT)):
                t0 = time.perf_counter()
                await admin(f"CREATE DATABASE {names[side]} TEMPLATE {names['tpl']}")
                print(f"[{side}] copied in {time.perf_counter() - t0:.1f} s ...", flush=True)
                result[side] = await one_side(root, names[side], workdir, side == "new", args.export)
                print(json.dumps({side: result[side]}), flush=True)
                await admin(f"DROP DATABASE IF EXISTS {names[side]} WITH (FORCE)")
        finally:
            for db in names.values():
                await admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        if args.import_rows:
            result["imports"] = await imports(old, args.import_rows, tag, workdir)
    with (out / f"partitions-{tag}.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the month pruned")
    p.add_argument("--old", help="a checkout of the code before 0006 (git archive 2e6bac9)")
    p.add_argument("--months-db", help="only make this database: 12 past months (bench/ledger_write.py)")
    p.add_argument("--export", action="store_true", help="compare `db export` before and after 0006")
    p.add_argument("--import-rows", type=int, default=0, help="also time `db import` of this many rows")
    p.add_argument("--tag", help="names the databases and the result file (default: --rows)")
    p.add_argument("--out", default="bench/results/pg-partitions")
    args = p.parse_args()
    if args.months_db:  # a database for bench/ledger_write.py --dsn
        asyncio.run(months_ledger(args.months_db, 12, 20_000))
        print(f"{args.months_db}: 12 past months of 20,000 rows, 14 partitions")
        return 0
    if not args.old:
        raise SystemExit("--old is required (a checkout of the code before 0006)")
    old = Path(args.old).resolve()
    if not (old / "proxy" / "ledger" / "postgres.py").exists():
        raise SystemExit(f"--old {old} is not a checkout of together-meter")
    return asyncio.run(main_async(args, old))


if __name__ == "__main__":
    sys.exit(main())
