"""Paired throughput ratios from one run of ../shared/bench/run_bench.sh (its runs.jsonl).

A machine-wide slow spell (another tenant of the host, PostgreSQL's autovacuum or checkpoint)
moves every target of one repetition together, so the ratio of medians across repetitions can
hide or invent a gap. This pairs the k-th run of target A with the k-th run of target B at the
same mode and concurrency (the same repetition: run_bench.sh runs each (mode, c) group of every
repetition back to back) and reports each repetition's ratio and their median.

    python bench/paired.py bench/results/<run>/runs.jsonl ours-1w/ours-sqlite ours-2w/ours-1w
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def paired(rows: list[dict], a: str, b: str) -> dict[tuple[str, int], list[float]]:
    """(mode, c) -> [rps(a) / rps(b) per repetition]."""
    seen: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        seen[(r["label"], r["mode"], r["concurrency"])].append(r["rps"])
    out: dict[tuple[str, int], list[float]] = {}
    for (label, mode, c), runs in seen.items():
        if label != a or (b, mode, c) not in seen:
            continue
        other = seen[(b, mode, c)]
        out[(mode, c)] = [x / y for x, y in zip(runs, other, strict=False) if y > 0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="runs.jsonl of one run_bench.sh run")
    p.add_argument("pairs", nargs="+", help="A/B target labels, e.g. ours-1w/ours-sqlite")
    args = p.parse_args()
    rows = [json.loads(line) for line in args.runs.read_text().splitlines() if line.strip()]
    print("| A / B | mode | c | ratio per repetition | median |")
    print("|---|---|---|---|---|")
    for pair in args.pairs:
        a, b = pair.split("/")
        for (mode, c), ratios in sorted(paired(rows, a, b).items()):
            each = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"| {a} / {b} | {mode} | {c} | {each} | **{statistics.median(ratios):.2f}** |")


if __name__ == "__main__":
    main()
