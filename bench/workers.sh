#!/usr/bin/env bash
# `serve --workers 2` against one process (`--workers 1`), both on the PostgreSQL ledger, and the
# same single process on the SQLite ledger, in one run of ../shared/bench/run_bench.sh (direct +
# the three, interleaved; see docs/benchmarks.md).
#   bash bench/workers.sh                      # full run (REPS=3 DURATION=10: about 8 minutes)
#   REPS=1 DURATION=5 bash bench/workers.sh    # quick look
# Knobs: ONE_CPUS=1 (cores of the single process), TWO_CPUS=0,1 (the supervisor and its workers),
# PG_ADMIN_DSN (default postgresql://postgres@127.0.0.1:5432/postgres), PG_CPUS (e.g. 0: pin every
# process of the local PostgreSQL server there for the run, beside the load generator and the
# upstream, so that it does not take the single process's core; restored to all cores at exit),
# and run_bench.sh's own. Paired ratios per repetition: python bench/paired.py $OUT/runs.jsonl ...
# Each process gets a fresh database (tm_bench_<stamp>_1w / _2w), dropped at the end.
# Needs the harness venv: bash ../shared/bench/setup_env.sh. Loopback only; every run is bounded.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
BENCH_VENV="${BENCH_VENV:-$HOME/.cache/meter-bench/venv}"
export PY="${PY:-$BENCH_VENV/bin/python}"
METER="${METER:-$ROOT/.venv/bin/together-meter}"
ONE_CPUS="${ONE_CPUS:-1}"
TWO_CPUS="${TWO_CPUS:-0,1}"
PG_ADMIN_DSN="${PG_ADMIN_DSN:-postgresql://postgres@127.0.0.1:5432/postgres}"
PG_CPUS="${PG_CPUS:-}"
STAMP="$(date +%Y%m%d_%H%M%S)"
export OUT="${OUT:-$HERE/results/workers-$STAMP}"
mkdir -p "$OUT"
DBS=("tm_bench_${STAMP}_1w" "tm_bench_${STAMP}_2w")
PIDS=()
SQLITE_DIR=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do  # the supervisor stops its workers (drain_timeout, then SIGKILL)
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  done
  for db in "${DBS[@]}"; do psql "$PG_ADMIN_DSN" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true; done
  if [[ -n "$SQLITE_DIR" ]]; then rm -rf "$SQLITE_DIR"; fi
  if [[ -n "$PG_CPUS" ]]; then pin_postgres "0-$(($(nproc) - 1))"; fi
}
pin_postgres() {  # CPUS: every process of the server; the postmaster's new backends inherit it
  for p in $(pgrep -x postgres); do taskset -a -p -c "$1" "$p" >/dev/null || true; done
}
trap cleanup EXIT INT TERM

for port in 18300 19300 18301 19301 18302 19302; do
  if ss -Hltn "sport = :$port" | grep -q .; then echo "port $port is busy" >&2; exit 1; fi
done
if [[ -n "$PG_CPUS" ]]; then pin_postgres "$PG_CPUS"; fi
for db in "${DBS[@]}"; do psql "$PG_ADMIN_DSN" -qc "CREATE DATABASE $db"; done
base="${PG_ADMIN_DSN%/*}"

start() {  # NAME CPUS DB PORT ADMIN_PORT WORKERS
  TOGETHER_API_KEY=fake-together-key TM_BENCH_DSN="$base/$3" taskset -c "$2" "$METER" \
    --log-level WARNING serve --config "$HERE/config-postgres.yaml" --port "$4" --admin-port "$5" \
    --workers "$6" >"$OUT/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$5/healthz" >/dev/null 2>&1 && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "$1 died: see $OUT/$1.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "$1 not ready: see $OUT/$1.log" >&2; exit 1
}
start ours-1w "$ONE_CPUS" "${DBS[0]}" 18300 19300 1
start ours-2w "$TWO_CPUS" "${DBS[1]}" 18301 19301 2
# the default single process on SQLite, same core as ours-1w (PostgreSQL vs SQLite in the same run)
SQLITE_DIR="$(mktemp -d -t meter-bench-sqlite.XXXXXX)"
TOGETHER_API_KEY=fake-together-key taskset -c "$ONE_CPUS" "$METER" --log-level WARNING serve \
  --config "$HERE/config.yaml" --port 18302 --admin-port 19302 --ledger "$SQLITE_DIR/ledger.db" \
  >"$OUT/ours-sqlite.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:19302/healthz >/dev/null 2>&1 && break; sleep 0.2; done
echo "ONE_CPUS=$ONE_CPUS TWO_CPUS=$TWO_CPUS PG_CPUS=${PG_CPUS:-all}" >"$OUT/cpus.txt"
# @PID: CPU and RSS of the process and its children (the supervisor's workers)
bash "$SHARED_BENCH/run_bench.sh" "ours-1w=http://127.0.0.1:18300/v1@${PIDS[0]}" \
  "ours-2w=http://127.0.0.1:18301/v1@${PIDS[1]}" "ours-sqlite=http://127.0.0.1:18302/v1@${PIDS[2]}"
"$PY" "$HERE/paired.py" "$OUT/runs.jsonl" ours-1w/ours-sqlite ours-2w/ours-1w ours-2w/ours-sqlite \
  | tee "$OUT/paired.md"
for i in 0 1; do
  echo "ledger rows of ${DBS[$i]}:"
  psql "$base/${DBS[$i]}" -Atc "SELECT status, count(*) FROM requests GROUP BY status"
done
