#!/usr/bin/env bash
# Two commits of together-meter side by side on the SQLite ledger, with the harness's naive aiohttp
# proxy, in one run of ../shared/bench/run_bench.sh (direct + old + new + naive, interleaved, the
# order rotated each repetition). Paired per-repetition ratios go to $OUT/paired.md.
#   OLD=7830c06 NEW=6c25555 bash bench/old_new.sh
#   OLD=7830c06 NEW=6c25555 REPS=3 DURATION=8 CONCURRENCY="1 32" MODES="nonstream stream" \
#     OUT=bench/results/isolation-<stamp> bash bench/old_new.sh
# Each commit runs from its own temporary `git worktree add --detach` with this checkout's .venv
# python and PYTHONPATH=<worktree> (python -P, started from inside the worktree, so neither the
# current directory nor this checkout's editable install can supply the `proxy` package; checked
# before starting), with that worktree's own bench/config.yaml and a fresh SQLite ledger in its own
# temporary directory. Each proxy is one process on core 1 (PROXY_CPUS); the naive proxy too, as
# bench_all.sh starts it; run_bench.sh puts the fake upstream and the load generator on core 0.
# No LiteLLM. Loopback only; every run is bounded. On exit the proxies are stopped and the
# worktrees and temporary directories removed.
# Needs the harness venv: SKIP_LITELLM=1 bash ../shared/bench/setup_env.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
BENCH_VENV="${BENCH_VENV:-$HOME/.cache/meter-bench/venv}"
export PY="${PY:-$BENCH_VENV/bin/python}"
METER_PY="${METER_PY:-$ROOT/.venv/bin/python}"
OLD="${OLD:?set OLD to the earlier commit, e.g. OLD=7830c06}"
NEW="${NEW:?set NEW to the later commit, e.g. NEW=6c25555}"
PROXY_CPUS="${PROXY_CPUS:-1}"
UPSTREAM_PORT="${UPSTREAM_PORT:-18000}"
NAIVE_PORT=18100
OLD_PORT=18320 OLD_ADMIN=19320 NEW_PORT=18321 NEW_ADMIN=19321
STAMP="$(date +%Y%m%d_%H%M%S)"
export OUT="${OUT:-$HERE/results/oldnew-$STAMP}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d -t meter-oldnew.XXXXXX)"
PIDS=()
NAMES=()
LOADMON=""
cleanup() {
  [[ -n "$LOADMON" ]] && kill "$LOADMON" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
  done
  for w in old new; do git -C "$ROOT" worktree remove --force "$WORK/$w" 2>/dev/null || true; done
  git -C "$ROOT" worktree prune 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

for port in "$UPSTREAM_PORT" "$NAIVE_PORT" "$OLD_PORT" "$OLD_ADMIN" "$NEW_PORT" "$NEW_ADMIN"; do
  if ss -Hltn "sport = :$port" | grep -q .; then echo "port $port is busy (ss -ltnp 'sport = :$port')" >&2; exit 1; fi
done
[[ -x "$PY" ]] || { echo "no harness python at $PY: SKIP_LITELLM=1 bash ../shared/bench/setup_env.sh" >&2; exit 1; }

for w in old new; do
  rev="$OLD"; [[ $w == new ]] && rev="$NEW"
  git -C "$ROOT" worktree add --detach "$WORK/$w" "$rev" >/dev/null 2>&1
  mkdir -p "$WORK/$w-ledger"
done
{ echo "old $(git -C "$ROOT" rev-parse "$OLD")"; echo "new $(git -C "$ROOT" rev-parse "$NEW")"; } >"$OUT/commits.txt"
cp "$WORK/old/bench/config.yaml" "$OUT/config-old.yaml"
cp "$WORK/new/bench/config.yaml" "$OUT/config-new.yaml"

# no outbound proxy for the upstream client, whatever this shell has set
NOPROXY_ENV=(-u HTTPS_PROXY -u HTTP_PROXY -u ALL_PROXY -u https_proxy -u http_proxy -u all_proxy)

wait_ready() {  # NAME URL PID
  for _ in $(seq 1 100); do
    curl -sf "$2" >/dev/null 2>&1 && return 0
    kill -0 "$3" 2>/dev/null || { echo "$1 died: see $OUT/$1.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "$1 not ready: see $OUT/$1.log" >&2; exit 1
}

start_meter() {  # NAME WORKTREE PORT ADMIN_PORT
  local name=$1 src=$2 port=$3 admin=$4 got
  got="$(cd "$src" && PYTHONPATH="$src" "$METER_PY" -P -c 'import proxy; print(proxy.__file__)')"
  [[ "$got" == "$src/proxy/__init__.py" ]] || { echo "$name would import $got, not $src/proxy" >&2; exit 1; }
  (cd "$src" && exec env "${NOPROXY_ENV[@]}" PYTHONPATH="$src" TOGETHER_API_KEY=fake-together-key \
    taskset -c "$PROXY_CPUS" "$METER_PY" -P -c "import sys; from proxy.cli import main; sys.exit(main())" \
    --log-level WARNING serve --port "$port" --admin-port "$admin" \
    --config "$src/bench/config.yaml" --ledger "$WORK/$name-ledger/ledger.db") >"$OUT/$name.log" 2>&1 &
  PIDS+=($!); NAMES+=("$name")
  wait_ready "$name" "http://127.0.0.1:$admin/healthz" "${PIDS[-1]}"
}

start_meter old "$WORK/old" "$OLD_PORT" "$OLD_ADMIN"
start_meter new "$WORK/new" "$NEW_PORT" "$NEW_ADMIN"
taskset -c "$PROXY_CPUS" "$PY" "$SHARED_BENCH/naive_proxy.py" --port "$NAIVE_PORT" >"$OUT/naive.log" 2>&1 &
PIDS+=($!); NAMES+=(naive)
wait_ready naive "http://127.0.0.1:$NAIVE_PORT/metrics" "${PIDS[-1]}"

# load average (and CPU pressure, where the kernel reports it) every 30 s during the run, to tell
# a disturbed run from a slow commit (a `sleep` loop: no measurable CPU)
loadline() {
  echo "$(date +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" \
    "cpu-pressure $(head -1 /proc/pressure/cpu 2>/dev/null | cut -d' ' -f2-3)"
}
( while :; do loadline; sleep 30; done ) >"$OUT/load.txt" 2>&1 &
LOADMON=$!

UPSTREAM_PORT="$UPSTREAM_PORT" bash "$SHARED_BENCH/run_bench.sh" \
  "old=http://127.0.0.1:$OLD_PORT/v1@${PIDS[0]}" \
  "new=http://127.0.0.1:$NEW_PORT/v1@${PIDS[1]}" \
  "naive=http://127.0.0.1:$NAIVE_PORT/v1@${PIDS[2]}"
echo "$(loadline) (end)" >>"$OUT/load.txt"

for i in "${!PIDS[@]}"; do
  kill -0 "${PIDS[$i]}" 2>/dev/null || echo "WARNING: ${NAMES[$i]} (pid ${PIDS[$i]}) died during the run: see $OUT/${NAMES[$i]}.log" >&2
done
"$PY" "$HERE/paired.py" "$OUT/runs.jsonl" new/old new/naive old/naive | tee "$OUT/paired.md"

# stop the two meters (graceful), then count the rows each wrote
for i in 0 1; do kill "${PIDS[$i]}" 2>/dev/null || true; done
for i in 0 1; do for _ in $(seq 1 50); do kill -0 "${PIDS[$i]}" 2>/dev/null || break; sleep 0.2; done; done
for name in old new; do
  echo -n "$name ledger rows by status: "
  "$PY" - "$WORK/$name-ledger/ledger.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute("select status, count(*) from requests group by status").fetchall())
PY
done | tee "$OUT/ledger-rows.txt"
