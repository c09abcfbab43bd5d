#!/usr/bin/env bash
# The ledger write path, an older commit (OLD, default HEAD) against the working tree, interleaved:
# bench/ledger_write.py measures each one's ledger (`--root`), SQLite and PostgreSQL, REPS times.
#
#   OLD=HEAD REPS=5 OUT=bench/results/rollups-write-ab bash bench/ledger_write_ab.sh
#
# The old commit is unpacked with `git archive` into a temporary directory (the index and the
# working tree are not touched); PostgreSQL on 127.0.0.1:5432, one fresh database per side.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${OLD:-HEAD}
REPS=${REPS:-5}
OUT=${OUT:-bench/results/ledger-write-ab}
PY=${PY:-.venv/bin/python}
OLD_DIR=$(mktemp -d /tmp/ledger-write-old.XXXXXX)
trap 'rm -rf "$OLD_DIR"; for s in old new; do psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS tm_ab_$s WITH (FORCE)" >/dev/null 2>&1 || true; done' EXIT
git archive "$OLD" | tar -x -C "$OLD_DIR"
mkdir -p "$OUT"
git rev-parse "$OLD" > "$OUT/old-commit.txt"
for side in old new; do
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS tm_ab_$side WITH (FORCE)" -c "CREATE DATABASE tm_ab_$side" >/dev/null 2>&1
done
for rep in $(seq "$REPS"); do
  for side in old new; do
    root=$PWD
    [ "$side" = old ] && root=$OLD_DIR
    for backend in sqlite postgres; do
      args=(--backend "$backend" --concurrency 1 64 --requests 20000 --reps 1 --root "$root")
      [ "$backend" = postgres ] && args+=(--dsn "postgresql://postgres@127.0.0.1/tm_ab_$side" --requests 10000)
      "$PY" bench/ledger_write.py "${args[@]}" | while read -r line; do
        echo "{\"side\": \"$side\", \"rep\": $rep, \"run\": $line}"
      done >> "$OUT/runs.jsonl"
    done
  done
done
"$PY" - "$OUT/runs.jsonl" <<'EOF' | tee "$OUT/summary.md"
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print("| backend | c | side | requests/s (median, min-max) | proxy CPU µs/request | database CPU µs/request |")
print("|---|---|---|---|---|---|")
keys = sorted({(r["run"]["backend"], r["run"]["concurrency"]) for r in runs})
for backend, c in keys:
    for side in ("old", "new"):
        sel = [r["run"] for r in runs if r["side"] == side and r["run"]["backend"] == backend and r["run"]["concurrency"] == c]
        rps = sorted(r["requests_per_s"] for r in sel)
        cpu = statistics.median(r["proxy_cpu_us_per_request"] for r in sel)
        db = statistics.median(r["db_cpu_us_per_request"] for r in sel)
        print(f"| {backend} | {c} | {side} | {statistics.median(rps):,.0f} ({rps[0]:,}-{rps[-1]:,}) | {cpu} | {db if backend == 'postgres' else '-'} |")
EOF
