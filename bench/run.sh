#!/usr/bin/env bash
# The comparative benchmark: together-meter vs direct vs the naive aiohttp proxy vs LiteLLM,
# in one run of ../shared/bench (see docs/benchmarks.md). Loopback only; every run is bounded.
#   bash bench/run.sh                      # full run (about 15 minutes)
#   REPS=1 DURATION=5 bash bench/run.sh    # quick look
# Needs the harness venvs: bash ../shared/bench/setup_env.sh (creates them outside the repo).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
METER="${METER:-$ROOT/.venv/bin/together-meter}"
PROXY_CPUS="${PROXY_CPUS:-1}"
STAMP="$(date +%Y%m%d-%H%M%S)"
export OUT="${OUT:-$HERE/results/$STAMP}"
mkdir -p "$OUT"
WORK="$(mktemp -d -t meter-bench.XXXXXX)"
PID=""
cleanup() { [[ -n "$PID" ]] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

if ss -Hltn "sport = :18300" | grep -q .; then
  echo "port 18300 is busy: stop whatever listens there first (ss -ltnp 'sport = :18300')" >&2; exit 1
fi
# the proxy gets core 1 alone, like the other proxies bench_all.sh starts
TOGETHER_API_KEY=fake-together-key taskset -c "$PROXY_CPUS" "$METER" --log-level WARNING serve \
  --config "$HERE/config.yaml" --ledger "$WORK/ledger.db" >"$OUT/together-meter.log" 2>&1 &
PID=$!
for _ in $(seq 1 50); do
  curl -sf http://127.0.0.1:19300/healthz >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { echo "together-meter died: see $OUT/together-meter.log" >&2; exit 1; }
  sleep 0.2
done
bash "$SHARED_BENCH/bench_all.sh" "ours=http://127.0.0.1:18300/v1@$PID"
echo "ledger rows written during the run:"
"$ROOT/.venv/bin/python" - "$WORK/ledger.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute("select status, count(*) from requests group by status").fetchall())
PY
