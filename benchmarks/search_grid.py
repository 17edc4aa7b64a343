#!/usr/bin/env python3
"""Search efficiency, measured: record every point of the benchmark search space, then replay search methods.

    python benchmarks/search_grid.py record [--model M.gguf] [--passes 3] [--tg-tokens 16 --pp-tokens 64]
    python benchmarks/search_grid.py replay benchmarks/results/grid-*.json [--seeds 200]

``record`` measures every configuration the tuner could draw on this host (tuner.search_grid.grid_params), each
with the same statistics as a search trial (the tuner's Measurer: warm-up, samples until the interval is
narrow or the cap is reached), once per pass, each pass in its own random order, and writes
benchmarks/results/grid-<model>-<objective>.json after every measurement (atomically), so an interrupted
recording resumes where it stopped. The host and model descriptions go into
the file, so the grid can be replayed anywhere.

``replay`` runs the tuner's sampler and pruner, random search, the grid in random order and llama-optimus's
stage-wise search over each recorded grid, many seeds each, every measurement drawn afresh from the point's
recorded samples. It prints and writes (next to the grid, ``.replay.json`` and ``.replay.txt``) the median
number of trials to come within 2% of the grid's best, the share of seeds within 2% after 20% of the grid's
trials (the target: the tuner's median at or under 20%), and how often a method ends truly slower than the
baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.atomic import write_atomic
from tuner.errors import TrialFailed
from tuner.model.checksum import model_sha256
from tuner.model.default_model import default_model_path
from tuner.model.gguf_file import ModelInfo, inspect_model
from tuner.paths import trial_log_dir
from tuner.probe import probe_host
from tuner.probe.host import HostProbe
from tuner.search import Measurer, MeasureSettings
from tuner.search_grid import METHODS, Grid, GridPoint, grid_params, replay_all
from tuner.server.build import deployed_server_binary
from tuner.space import SearchSpace
from tuner.trial.protocol import Warmup, Workload

RESULTS = Path(__file__).resolve().parent / "results"


def model_to_dict(model: ModelInfo) -> dict[str, Any]:
    """The model description as JSON can hold it (paths as text); :func:`model_from_dict` reads it back."""
    data = dataclasses.asdict(model)
    return {**data, "path": str(model.path), "files": [str(f) for f in model.files]}


def model_from_dict(data: dict[str, Any]) -> ModelInfo:
    return ModelInfo(**{**data, "path": Path(data["path"]), "files": tuple(Path(f) for f in data["files"])})


def space_of(grid_file: dict[str, Any]) -> SearchSpace:
    return SearchSpace(HostProbe.from_dict(grid_file["host"]), model_from_dict(grid_file["model"]),
                       grid_file["objective"], usable_cpus=grid_file["usable_cpus"])


def measurer_for(data: dict[str, Any], model: ModelInfo) -> Measurer:
    """The trial Measurer with the grid's workload and sampling cap: every pass of a grid measures alike."""
    workload = data["workload"]
    cap = data["max_measure_seconds"]
    settings = MeasureSettings(objective=data["objective"], server_binary=deployed_server_binary(),
                               workload=Workload(pp_tokens=workload["pp_tokens"], tg_tokens=workload["tg_tokens"]),
                               warmup=Warmup(max_seconds=cap / 2), max_measure_seconds=cap)
    return Measurer(model, settings, trial_log_dir("search-grid"), multi_node=space_of(data).multi_node,
                    model_sha256=model_sha256(model.files))


def record(args: argparse.Namespace) -> int:
    """Measure every point of the grid in ``--passes`` passes, each in a fresh random order, pooling the samples.

    This machine's speed drifts from minute to minute by more than the knobs move it (one point read 121 tok/s
    in one pass and 158 in the next), and one pass reads each point in one stretch of a few seconds: a
    point measured in a fast minute would be recorded as fast for good, and it is the top of the grid that
    decides "within 2% of the best". Passes in independent orders read every point in several minutes, so the
    drift lands on all points alike and a point's pooled median is its value, not its minute's. Each pass's
    samples are kept apart too (``passes``); the file is written after every measurement, so a stopped recording
    resumes where it stopped.
    """
    model = inspect_model(args.model or default_model_path())
    probe = probe_host(bandwidth=False)
    space = SearchSpace(probe, model, args.objective, usable_cpus=probe.allowed_cpus)
    out = args.out or RESULTS / f"grid-{model.path.stem.lower()}-{args.objective}.json"
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {
        "objective": args.objective, "host": probe.to_dict(), "model": model_to_dict(model),
        "usable_cpus": list(probe.allowed_cpus) if probe.allowed_cpus is not None else None,
        "workload": {"pp_tokens": args.pp_tokens, "tg_tokens": args.tg_tokens},
        "max_measure_seconds": args.max_measure, "baseline_key": space.baseline().key(), "points": []}
    if data["points"] and "passes" not in data["points"][0]:
        raise SystemExit(f"{out} was recorded in one pass by an older script: record to another --out")
    points = {point["key"]: point for point in data["points"]}
    for params in grid_params(space):
        config = space.config_from_params(params)
        points.setdefault(config.key(), {"params": params, "key": config.key(), "config": config.to_dict(),
                                         "passes": []})
    data["points"] = list(points.values())
    data["passes"] = args.passes
    measurer = measurer_for(data, model)
    todo = [(number, point) for number in range(args.passes) for point in pass_order(data["points"], number)
            if len(point["passes"]) <= number and "failure" not in point]
    started = time.monotonic()
    print(f"{len(data['points'])} points, {args.passes} passes: {len(todo)} measurements to take -> {out}",
          flush=True)
    for done, (number, point) in enumerate(todo, 1):
        config = space.config_from_params(point["params"])
        try:
            values = measurer.run(config, f"grid-{number}-{data['points'].index(point):04d}").values
        except TrialFailed as failed:
            point["failure"] = failed.reason
            values = []
        else:
            point["passes"].append(values)
            point["samples"] = [value for pass_values in point["passes"] for value in pass_values]
        write_atomic(out, json.dumps(data, indent=1) + "\n", keep_previous=False)
        shown = f"{statistics.median(values):.1f}" if values else point["failure"]
        print(f"[pass {number + 1}, {done}/{len(todo)} ETA {eta_minutes(started, done, len(todo)):.0f} min] "
              f"{shown}  {point['key']}", flush=True)
    return 0


def eta_minutes(started: float, done: int, total: int) -> float:
    """Minutes left at the pace so far (``started``: a time.monotonic() reading; ``done`` of ``total``)."""
    return (time.monotonic() - started) / done * (total - done) / 60


def pass_order(points: list[dict[str, Any]], number: int) -> list[dict[str, Any]]:
    """Pass ``number``'s order: a shuffle seeded by the pass, so a resumed recording keeps it."""
    order = list(points)
    random.Random(number).shuffle(order)
    return order


class ReplayProgress:
    """One line on stderr every 20 seeds, with an ETA: a grid's replay takes 10 to 25 minutes here."""

    def __init__(self, grid_name: str, seeds: int) -> None:
        self.grid_name, self.seeds = grid_name, seeds
        self.methods: list[str] = []
        self.started = time.monotonic()

    def __call__(self, method: str, done: int) -> None:
        if method not in self.methods:
            self.methods.append(method)
        finished = (len(self.methods) - 1) * self.seeds + done
        if done % 20 == 0 or done == self.seeds:
            eta = eta_minutes(self.started, finished, len(METHODS) * self.seeds)
            print(f"[{self.grid_name}: {method} ({len(self.methods)}/{len(METHODS)}), seed {done}/{self.seeds}, "
                  f"ETA {eta:.0f} min]", file=sys.stderr, flush=True)


def replay(args: argparse.Namespace) -> int:
    for path in args.grids:
        data = json.loads(path.read_text())
        points = tuple(GridPoint.from_record(p) for p in data["points"] if p.get("samples"))
        failed = len(data["points"]) - len(points)
        grid = Grid(points, data["baseline_key"])
        space = space_of(data)
        lines = [f"{path.name}: {len(points)} points ({failed} failed), best {grid.best_value:.2f}, baseline "
                 f"{grid.point(grid.baseline_key).value:.2f}, {args.seeds} seeds, 20% = "
                 f"{round(0.2 * len(points))} trials",
                 f"{'method':<28} {'median trials to 2%':>20} {'within 2% at 20%':>17} {'slower than baseline':>21}"]
        summaries = list(replay_all(grid, space, args.seeds, on_replayed=ReplayProgress(path.name, args.seeds)))
        for s in summaries:
            median = "never" if s.median_trials_to_within is None else f"{s.median_trials_to_within:.0f}"
            lines.append(f"{s.method:<28} {median:>20} {s.within_at_share:>17.0%} {s.slower_than_baseline:>21.0%}")
        text = "\n".join(lines) + "\n"
        print(text)
        write_atomic(path.with_suffix(".replay.txt"), text, keep_previous=False)
        write_atomic(path.with_suffix(".replay.json"), json.dumps(
            {"grid": path.name, "points": len(points), "failed": failed, "seeds": args.seeds,
             "methods": [dataclasses.asdict(s) for s in summaries]}, indent=1) + "\n", keep_previous=False)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--model", type=Path)
    rec.add_argument("--objective", default="tg", choices=("tg", "pp", "both"))
    rec.add_argument("--pp-tokens", type=int, default=64)
    rec.add_argument("--tg-tokens", type=int, default=16)
    rec.add_argument("--max-measure", type=float, default=4.0)
    rec.add_argument("--passes", type=int, default=3, help="passes over the grid, each in its own order")
    rec.add_argument("--out", type=Path)
    rep = sub.add_parser("replay")
    rep.add_argument("grids", type=Path, nargs="+")
    rep.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    return {"record": record, "replay": replay}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
