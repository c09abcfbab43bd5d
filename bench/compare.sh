#!/usr/bin/env bash
# An earlier commit against the working tree on the PostgreSQL ledger, with the working tree on
# the SQLite ledger beside them, in one run of ../shared/bench/run_bench.sh (direct + the three,
# interleaved). Each proxy is one process on core 1 (ONE_CPUS); each PostgreSQL target has its own
# fresh database, dropped at the end. Paired per-repetition ratios go to $OUT/paired.md.
#   OLD=65a3c7f bash bench/compare.sh
#   OLD=65a3c7f MODES=nonstream CONCURRENCY=32 REPS=4 DURATION=8 bash bench/compare.sh
# The old commit runs from a temporary git worktree with this checkout's .venv (its `proxy`
# package first on PYTHONPATH). Needs the harness venv: bash ../shared/bench/setup_env.sh.
# Loopback only; every run is bounded.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
BENCH_VENV="${BENCH_VENV:-$HOME/.cache/meter-bench/venv}"
export PY="${PY:-$BENCH_VENV/bin/python}"
OLD="${OLD:?set OLD to the commit to compare against, e.g. OLD=HEAD~2}"
ONE_CPUS="${ONE_CPUS:-1}"
PG_ADMIN_DSN="${PG_ADMIN_DSN:-postgresql://postgres@127.0.0.1:5432/postgres}"
STAMP="$(date +%Y%m%d_%H%M%S)"
export OUT="${OUT:-$HERE/results/compare-$STAMP}"
mkdir -p "$OUT"
DBS=("tm_bench_${STAMP}_old" "tm_bench_${STAMP}_new")
WORK="$(mktemp -d -t meter-compare.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  done
  for db in "${DBS[@]}"; do psql "$PG_ADMIN_DSN" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true; done
  git -C "$ROOT" worktree remove --force "$WORK/old" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

for port in 18310 19310 18311 19311 18312 19312; do
  if ss -Hltn "sport = :$port" | grep -q .; then echo "port $port is busy" >&2; exit 1; fi
done
git -C "$ROOT" worktree add --detach "$WORK/old" "$OLD" >/dev/null 2>&1
git -C "$ROOT" rev-parse "$OLD" >"$OUT/old-commit.txt"
for db in "${DBS[@]}"; do psql "$PG_ADMIN_DSN" -qc "CREATE DATABASE $db"; done
base="${PG_ADMIN_DSN%/*}"

start() {  # NAME SOURCE_DIR PORT ADMIN_PORT [serve args...]
  local name=$1 src=$2 port=$3 admin=$4
  shift 4
  PYTHONPATH="$src" TOGETHER_API_KEY=fake-together-key taskset -c "$ONE_CPUS" \
    "$ROOT/.venv/bin/python" -P -c "import sys; from proxy.cli import main; sys.exit(main())" \
    --log-level WARNING serve --port "$port" --admin-port "$admin" "$@" >"$OUT/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "$name died: see $OUT/$name.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "$name not ready: see $OUT/$name.log" >&2; exit 1
}
TM_BENCH_DSN="$base/${DBS[0]}" start pg-old "$WORK/old" 18310 19310 --config "$HERE/config-postgres.yaml"
TM_BENCH_DSN="$base/${DBS[1]}" start pg-new "$ROOT" 18311 19311 --config "$HERE/config-postgres.yaml"
start sqlite-new "$ROOT" 18312 19312 --config "$HERE/config.yaml" --ledger "$WORK/ledger.db"
bash "$SHARED_BENCH/run_bench.sh" "pg-old=http://127.0.0.1:18310/v1@${PIDS[0]}" \
  "pg-new=http://127.0.0.1:18311/v1@${PIDS[1]}" "sqlite-new=http://127.0.0.1:18312/v1@${PIDS[2]}"
"$PY" "$HERE/paired.py" "$OUT/runs.jsonl" pg-new/pg-old pg-old/sqlite-new pg-new/sqlite-new \
  | tee "$OUT/paired.md"
