"""Run each atheris fuzz target for a bounded number of runs and time (`make fuzz`); fail on a crash.

Each target starts from its seed corpus in tests/fuzz/corpus/<name>/ (read only: the inputs it
finds go to a scratch directory, not into the repository) and writes crashing inputs to
<workdir>/crashes/. To keep a crash as a regression seed, copy it into the seed corpus: the fast
tier (tests/fuzz/test_corpus.py) then replays it on every `make test`.

    python tests/fuzz/runner.py [--runs N] [--seconds S] [--workdir DIR] [sse] [request]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"sse": HERE / "fuzz_sse.py", "request": HERE / "fuzz_request.py"}
MAX_LEN = {"sse": 4096, "request": 16384}  # deep-nesting and long-string requests need room
STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
COVERAGE = re.compile(r"cov: (\d+) ft: (\d+)")


def fuzz(name: str, runs: int, seconds: int, workdir: Path) -> dict[str, str | int | float]:
    """One target under libFuzzer: its final statistics, or an AssertionError naming the crash."""
    scratch, crashes = workdir / f"corpus-{name}", workdir / "crashes"
    scratch.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    argv = [
        sys.executable,
        str(TARGETS[name]),
        str(scratch),
        str(HERE / "corpus" / name),
        f"-runs={runs}",
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN[name]}",
        f"-dict={HERE / f'{name}.dict'}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={crashes}/{name}-",
    ]
    t0 = time.monotonic()
    with log.open("wb") as out:
        # the wall-clock cap is a backstop: libFuzzer stops itself at -max_total_time
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 300).returncode
    text = log.read_text(errors="replace")
    stats: dict[str, str | int | float] = {k: int(v) for k, v in STAT.findall(text)}
    cov = COVERAGE.findall(text)
    stats.update(
        target=name,
        seconds=round(time.monotonic() - t0, 1),
        cov=int(cov[-1][0]) if cov else 0,
        ft=int(cov[-1][1]) if cov else 0,
        exit=code,
    )
    found = sorted(p.name for p in crashes.glob(f"{name}-*"))
    assert code == 0 and not found, f"{name}: exit {code}, crash inputs {found}; log {log}:\n{text[-3000:]}"
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    p.add_argument("--runs", type=int, default=200_000)
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="together-meter-fuzz-"))
    failed = False
    for name in args.targets or TARGETS:
        try:
            s = fuzz(name, args.runs, args.seconds, workdir)
        except AssertionError as exc:
            print(f"FAIL {exc}", file=sys.stderr)
            failed = True
            continue
        print(
            f"{name}: {s.get('number_of_executed_units', '?')} runs in {s['seconds']} s "
            f"({s.get('average_exec_per_sec', '?')}/s), cov {s['cov']} ft {s['ft']}, "
            f"{s.get('new_units_added', 0)} new inputs, peak RSS {s.get('peak_rss_mb', '?')} MB, no crash"
        )
    print(f"work directory: {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
