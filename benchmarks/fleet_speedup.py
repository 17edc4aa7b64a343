"""Benchmark: trials per hour of N fleet workers against one study, vs. one worker, on this machine.

For each N, a new study is searched by N `llamahost fleet work` processes started together, each with the
same time budget, on a real PostgreSQL (a private throw-away cluster, or --storage). Reported per N:

* finished trials (complete + pruned + failed) and trials per hour, over the workers' wall time (start-up
  included) and over the steady window (first trial start to last trial end);
* the speed-up of each rate over N = 1;
* the median objective value (tg tok/s) of the finished trials and of the baseline trial: workers that
  share one host's cores also slow each other's *measurements*, which a real fleet (one worker per
  host) does not do. This is the number that says how far local workers are from a fleet.

Usage: python benchmarks/fleet_speedup.py [--workers 1,2,3] [--budget 150s] [--model M.gguf]
       [--storage postgresql://...] [--out benchmarks/fleet_speedup.out]
Writes <out>.json and <out>.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fleet"))  # the private PostgreSQL cluster the fleet tests use

from pg_cluster import PgCluster  # noqa: E402

WORKLOAD = ["--pp-tokens", "32", "--tg-tokens", "8", "--max-measure", "2"]


@contextlib.contextmanager
def store(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    cluster = PgCluster.start()
    try:
        cluster.create_user("bench", "bench-pw")
        cluster.create_database("fleet_bench", "bench")
        yield cluster.url("bench", "bench-pw", "fleet_bench")
    finally:
        cluster.stop()


def run_workers(n: int, args: argparse.Namespace, url: str, home: Path, study: str) -> dict[str, Any]:
    env = {**os.environ, "LLAMAHOST_HOME": str(home)}
    cmd = [sys.executable, "-m", "tuner.cli", "fleet", "work", "--storage", url, "--study", study,
           "--budget", args.budget, "--json", *WORKLOAD]
    if args.model:
        cmd += ["--model", str(args.model)]
    started = time.monotonic()
    procs = [subprocess.Popen([*cmd, "--worker-name", f"bench-{i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    reports = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"worker failed ({proc.returncode}): {err[-2000:]}")
        reports.append(json.loads(out))
    wall = time.monotonic() - started
    trials = optuna.load_study(study_name=study, storage=url.replace("postgresql://", "postgresql+psycopg2://"),
                               ).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    starts = [t.datetime_start for t in finished if t.datetime_start]
    ends = [t.datetime_complete for t in finished if t.datetime_complete]
    steady = (max(ends) - min(starts)).total_seconds() if starts and ends else wall
    values = [t.value for t in finished if t.value is not None]
    baseline = [t.value for t in finished if t.user_attrs.get("role") == "baseline" and t.value is not None]
    return {
        "workers": n,
        "finished_trials": len(finished),
        "complete": sum(1 for t in finished if t.state.name == "COMPLETE"),
        "pruned": sum(1 for t in finished if t.state.name == "PRUNED"),
        "failed": sum(1 for t in finished if t.state.name == "FAIL"),
        "wall_seconds": wall,
        "steady_seconds": steady,
        "trials_per_hour_wall": 3600 * len(finished) / wall,
        "trials_per_hour_steady": 3600 * len(finished) / steady,
        "median_trial_seconds": statistics.median((t.datetime_complete - t.datetime_start).total_seconds()
                                                  for t in finished if t.datetime_start and t.datetime_complete),
        "median_value_tg_tps": statistics.median(values) if values else None,
        "baseline_value_tg_tps": baseline[0] if baseline else None,
        "per_worker_trials": [r["trials_run"] for r in reports],
    }


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    base = rows[0]
    lines = [f"# fleet speed-up: N local workers vs 1 on one study ({meta['date']})", "",
             f"host: {meta['host']}, {meta['cpus']} CPUs; budget per worker {meta['budget']}; workload "
             f"{' '.join(WORKLOAD)}; load average before each run: {', '.join(meta['load_before'])}", "",
             "| workers | finished trials (c/p/f) | trials/h (wall) | speed-up | trials/h (steady) | speed-up | "
             "median trial s | median tg tok/s | baseline tg tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['workers']} | {row['finished_trials']} ({row['complete']}/{row['pruned']}/{row['failed']}) | "
            f"{row['trials_per_hour_wall']:.0f} | x{row['trials_per_hour_wall'] / base['trials_per_hour_wall']:.2f} | "
            f"{row['trials_per_hour_steady']:.0f} | "
            f"x{row['trials_per_hour_steady'] / base['trials_per_hour_steady']:.2f} | "
            f"{row['median_trial_seconds']:.1f} | {_num(row['median_value_tg_tps'])} | "
            f"{_num(row['baseline_value_tg_tps'])} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,3", help="comma-separated worker counts (first is the reference)")
    parser.add_argument("--budget", default="150s", help="time budget of every worker")
    parser.add_argument("--model", type=Path, help="GGUF model (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--storage", help="an existing PostgreSQL URL (default: a private throw-away cluster)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "fleet_speedup.out")
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    rows = []
    load_before = []
    with store(args.storage) as url, tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        for n in counts:
            load_before.append(f"N={n}: {load_average()}")
            print(f"{n} worker(s), budget {args.budget} each ...", file=sys.stderr, flush=True)
            row = run_workers(n, args, url, Path(tmp), f"bench-{stamp}-n{n}")
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    meta = {"date": stamp, "host": platform.node(), "cpus": os.cpu_count(), "budget": args.budget,
            "load_before": load_before}
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    text = render(rows, meta)
    Path(f"{args.out}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
