"""Benchmark: trials per hour of N fleet workers against one study, vs. one worker, on this machine.

For each N, a new study is searched by N `llamahost fleet work` processes started together, each with the
same time budget, on a real PostgreSQL (a private throw-away cluster, or --storage). The machine is shared
and noisy, so the worker counts are measured side by side in rounds (every N once per round, the order
rotated from round to round) and each speed-up is a ratio within one round. Reported per N, as medians
over the rounds (with the range of the per-round speed-ups):

* finished trials (complete + pruned + failed) and trials per hour, over the workers' wall time (start-up
  included) and over the steady window (first trial start to last trial end);
* the speed-up of each rate over the first worker count (N = 1) of the same round;
* the median and mean trial duration, the share of pruned trials, and how busy the workers were (the share
  of their steady time spent inside trials): what sets the rate, the trials or what lies between them;
* the median objective value (tg tok/s) of the finished trials and of the baseline trial: workers that
  share one host's cores also slow each other's *measurements*, which a real fleet (one worker per
  host) does not do. This is the number that says how far local workers are from a fleet.

Usage: python benchmarks/fleet_speedup.py [--workers 1,2,3] [--rounds 3] [--budget 120s] [--model M.gguf]
       [--storage postgresql://...] [--out benchmarks/fleet_speedup.out]
Writes <out>.json (every run) and <out>.txt (the table), atomically.
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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fleet"))  # the private PostgreSQL cluster the fleet tests use

from pg_cluster import PgCluster  # noqa: E402

from tuner.atomic import write_atomic  # noqa: E402

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
    # Co-located on purpose (what N workers cost on one machine): each gets a measuring lock of its own,
    # as it would on its own host.
    procs = [subprocess.Popen([*cmd, "--worker-name", f"bench-{i}"],
                              env={**env, "LLAMAHOST_LOCK_DIR": str(home / "locks" / f"bench-{i}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
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
    durations = [(t.datetime_complete - t.datetime_start).total_seconds()
                 for t in finished if t.datetime_start and t.datetime_complete]
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
        "median_trial_seconds": statistics.median(durations),
        "mean_trial_seconds": statistics.mean(durations),
        # share of the workers' steady time spent inside trials: near 1, the rate is set by how long trials
        # take; well below 1, by what happens between them (sampling, the store, starting a trial process)
        "busy_fraction": sum(durations) / (n * steady),
        "median_value_tg_tps": statistics.median(values) if values else None,
        "baseline_value_tg_tps": baseline[0] if baseline else None,
        "per_worker_trials": [r["trials_run"] for r in reports],
    }


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def summarize(runs: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """Per worker count: medians over the rounds, speed-ups as ratios to the reference count of each round."""
    reference = counts[0]
    by_round = {(r["round"], r["workers"]): r for r in runs}
    rows = []
    for n in counts:
        mine = [r for r in runs if r["workers"] == n]
        speedups = {rate: [r[rate] / by_round[(r["round"], reference)][rate] for r in mine]
                    for rate in ("trials_per_hour_wall", "trials_per_hour_steady")}
        rows.append({
            "workers": n,
            "rounds": len(mine),
            "finished_trials": statistics.median(r["finished_trials"] for r in mine),
            **{f"median_{rate}": statistics.median(r[rate] for r in mine) for rate in speedups},
            **{f"speedup_{rate}": {"median": statistics.median(s), "min": min(s), "max": max(s)}
               for rate, s in speedups.items()},
            "median_trial_seconds": statistics.median(r["median_trial_seconds"] for r in mine),
            "mean_trial_seconds": statistics.median(r["mean_trial_seconds"] for r in mine),
            "busy_fraction": statistics.median(r["busy_fraction"] for r in mine),
            "pruned_share": statistics.median(r["pruned"] / r["finished_trials"] for r in mine),
            "median_value_tg_tps": _median_or_none(r["median_value_tg_tps"] for r in mine),
            "baseline_value_tg_tps": _median_or_none(r["baseline_value_tg_tps"] for r in mine),
        })
    return rows


def _median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# fleet speed-up: N local workers vs {rows[0]['workers']} on one study ({meta['date']})", "",
             f"host: {meta['host']}, {meta['cpus']} CPUs; budget per worker {meta['budget']}; workload "
             f"{' '.join(WORKLOAD)}; {meta['rounds']} rounds, every worker count once per round (order rotated); "
             f"medians over the rounds, speed-up = ratio to the first count in the same round [min, max]", "",
             f"load average before each round: {', '.join(meta['load_before'])}", "",
             "| workers | finished trials | trials/h (wall) | speed-up (wall) | trials/h (steady) "
             "| speed-up (steady) | trial s (median / mean) | pruned | busy | median tg tok/s | baseline tg tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        wall, steady = row["speedup_trials_per_hour_wall"], row["speedup_trials_per_hour_steady"]
        lines.append(
            f"| {row['workers']} | {row['finished_trials']:.0f} | {row['median_trials_per_hour_wall']:.0f} | "
            f"x{wall['median']:.2f} [{wall['min']:.2f}, {wall['max']:.2f}] | "
            f"{row['median_trials_per_hour_steady']:.0f} | "
            f"x{steady['median']:.2f} [{steady['min']:.2f}, {steady['max']:.2f}] | "
            f"{row['median_trial_seconds']:.1f} / {row['mean_trial_seconds']:.1f} | {row['pruned_share']:.0%} | "
            f"{row['busy_fraction']:.0%} | {_num(row['median_value_tg_tps'])} | "
            f"{_num(row['baseline_value_tg_tps'])} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,3", help="comma-separated worker counts (first is the reference)")
    parser.add_argument("--rounds", type=int, default=3, help="times every worker count is measured (default 3)")
    parser.add_argument("--budget", default="120s", help="time budget of every worker")
    parser.add_argument("--model", type=Path, help="GGUF model (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--storage", help="an existing PostgreSQL URL (default: a private throw-away cluster)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "fleet_speedup.out")
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    if args.rounds < 1 or not counts or min(counts) < 1:
        parser.error("--rounds and every worker count must be at least 1")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    runs = []
    load_before = []
    with store(args.storage) as url, tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        for round_ in range(args.rounds):
            load_before.append(f"round {round_ + 1}: {load_average()}")
            shift = round_ % len(counts)
            for n in counts[shift:] + counts[:shift]:  # rotated, so no count always runs first or last
                print(f"round {round_ + 1}/{args.rounds}: {n} worker(s), budget {args.budget} each ...",
                      file=sys.stderr, flush=True)
                run = {"round": round_, **run_workers(n, args, url, Path(tmp), f"bench-{stamp}-r{round_}-n{n}")}
                print(json.dumps(run), file=sys.stderr, flush=True)
                runs.append(run)
    meta = {"date": stamp, "host": platform.node(), "cpus": os.cpu_count(), "budget": args.budget,
            "rounds": args.rounds, "load_before": load_before}
    rows = summarize(runs, counts)
    write_atomic(Path(f"{args.out}.json"), json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2) + "\n")
    text = render(rows, meta)
    write_atomic(Path(f"{args.out}.txt"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
