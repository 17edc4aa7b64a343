"""Benchmark: how long ``llamahost --help`` and ``llamahost tune --help`` take to start, against bare Python.

Every command once imported Optuna, SQLAlchemy, SciPy and matplotlib to build its parser (about two seconds on
this machine); they are now imported by the command that runs. Each case is a new interpreter, run in rounds
with the cases interleaved (the machine is shared and noisy), and reported as medians and as ratios to bare
Python measured in the same rounds. With ``--baseline-tree DIR`` (a checkout of an older llamahost, e.g.
``git worktree add /tmp/old HEAD~1``) its ``--help`` is measured in the same rounds too.

Usage: python benchmarks/cli_startup.py [--rounds 15] [--baseline-tree DIR] [--out benchmarks/cli_startup.out]
Writes <out>.json (every sample) and <out>.txt (the table), atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tuner.atomic import write_atomic  # noqa: E402  (the repository is put on the path first)


def cases(baseline_tree: Path | None) -> dict[str, tuple[list[str], Path]]:
    python = sys.executable
    found = {
        "python -c pass": ([python, "-c", "pass"], REPO),
        "llamahost --help": ([python, "-m", "tuner.cli", "--help"], REPO),
        "llamahost tune --help": ([python, "-m", "tuner.cli", "tune", "--help"], REPO),
    }
    if baseline_tree is not None:
        found["baseline tree: llamahost --help"] = ([python, "-m", "tuner.cli", "--help"], baseline_tree)
    return found


def time_once(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "cli_startup.out")
    args = parser.parse_args()
    runs = cases(args.baseline_tree)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _, (argv, cwd) in runs.items():
        time_once(argv, cwd)  # warm the page cache and the bytecode caches once
    for round_no in range(args.rounds):
        order = list(runs)
        order = order[round_no % len(order):] + order[:round_no % len(order)]  # rotate: no case always first
        for name in order:
            samples[name].append(time_once(*runs[name]))
    bare = samples["python -c pass"]
    rows = []
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, bare, strict=True)]
        rows.append({"case": name, "median_s": statistics.median(values), "min_s": min(values),
                     "max_s": max(values), "median_ratio_to_bare_python": statistics.median(ratios)})
    lines = [f"cli_startup: {args.rounds} rounds, {platform.node()}, Python {platform.python_version()}",
             f"{'case':34} {'median s':>9} {'min s':>7} {'max s':>7} {'x bare python':>14}"]
    lines += [f"{r['case']:34} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
              f"{r['median_ratio_to_bare_python']:14.2f}" for r in rows]
    if args.baseline_tree is not None:
        now = samples["llamahost --help"]
        before = samples["baseline tree: llamahost --help"]
        speedup = statistics.median(b / n for b, n in zip(before, now, strict=True))
        lines.append(f"llamahost --help: {speedup:.2f}x faster than the baseline tree (median of per-round ratios)")
    text = "\n".join(lines) + "\n"
    write_atomic(args.out.with_suffix(".json"), json.dumps({"rows": rows, "samples": samples}, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".txt"), text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
