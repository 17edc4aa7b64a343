"""Every configuration of a search space, and a replay of search methods over a measured grid of them.

Whether the tuner's sampler finds a good configuration in few trials is a claim about one host and one model.
The way to test it: measure every point of the space once, with the same statistics as a trial
(benchmarks/search_grid.py), then replay each search method many times over the recorded grid, each time
drawing a point's measurement afresh from its recorded samples (a bootstrap median), so a method meets the
noise it would meet on the host. Pure logic; the scripts under benchmarks/ do the measuring and the writing.

:func:`grid_params` walks :meth:`tuner.space.SearchSpace.draw` as a decision tree (every ``suggest_*`` call is
a branch), so the grid is exactly the space the tuner samples, conditional dimensions included, and each point
is rebuilt through the same function the tuner uses.
"""

from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from tuner.space import SearchSpace
from tuner.study import REPEAT_ATTR, REPEAT_LIMIT, RepeatPolicy, make_pruner, make_sampler, quiet_optuna

WITHIN = 0.02  # "near the optimum": a true value within 2% of the grid's best
STAGES = (("ubatch_log2", "batch_log2", "threads_batch"), ("flash_attn",))  # llama-optimus: batch, then FA


class _PathTrial:
    """Answers ``suggest_*`` from a path of choice indexes (the first choice past its end), recording each
    decision as (index, number of choices)."""

    def __init__(self, path: Sequence[int]) -> None:
        self.path = path
        self.taken: list[tuple[int, int]] = []
        self.params: dict[str, Any] = {}

    def _choose(self, count: int) -> int:
        depth = len(self.taken)
        index = self.path[depth] if depth < len(self.path) else 0
        self.taken.append((index, count))
        return index

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.params[name] = low + self._choose(high - low + 1)
        return int(self.params[name])

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        self.params[name] = choices[self._choose(len(choices))]
        return self.params[name]


def grid_params(space: SearchSpace) -> list[dict[str, Any]]:
    """The parameters of every distinct configuration ``space`` can draw, in depth-first order."""
    seen: set[str] = set()
    points: list[dict[str, Any]] = []
    path: list[int] | None = []
    while path is not None:
        trial = _PathTrial(path)
        key = space.draw(trial).key()
        if key not in seen:
            seen.add(key)
            points.append(trial.params)
        path = _next_path(trial.taken)
    return points


def _next_path(taken: Sequence[tuple[int, int]]) -> list[int] | None:
    """The next branch of the decision tree, odometer-style from the deepest decision; None after the last."""
    for depth in range(len(taken) - 1, -1, -1):
        index, count = taken[depth]
        if index + 1 < count:
            return [i for i, _ in taken[:depth]] + [index + 1]
    return None


@dataclass(frozen=True)
class GridPoint:
    params: dict[str, Any]
    key: str
    samples: tuple[float, ...]  # every value recorded for this point (tok/s, one per request), all passes pooled
    draws: int | None = None  # how many samples one trial took (default: all of them, a one-pass recording)

    @property
    def value(self) -> float:
        """The point's true value, as far as the grid knows: the median of its recorded samples."""
        return statistics.median(self.samples)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> GridPoint:
        """A point as benchmarks/search_grid.py records it: pooled ``samples`` and, per pass, that pass's.

        A replayed trial draws as many samples as one pass took, not the pool's size: pooling three passes
        must not make each trial three times as precise as the tuner's are.
        """
        passes = record.get("passes") or [record["samples"]]
        draws = round(statistics.median(len(values) for values in passes))
        return cls(record["params"], record["key"], tuple(record["samples"]), max(1, draws))


@dataclass(frozen=True)
class Grid:
    points: tuple[GridPoint, ...]
    baseline_key: str

    def __post_init__(self) -> None:
        if not self.points or self.baseline_key not in {p.key for p in self.points}:
            raise ValueError("a grid needs points, the baseline among them")

    def point(self, key: str) -> GridPoint:
        return next(p for p in self.points if p.key == key)

    @property
    def best_value(self) -> float:
        return max(p.value for p in self.points)


# A method: given the grid, the space, a random generator and a trial budget, measure points one by one
# through ``measure`` (which draws a noisy observation, or None when the trial was pruned).
Measure = Callable[[GridPoint, optuna.Trial | None], float | None]
Method = Callable[[Grid, SearchSpace, random.Random, int, Measure], None]


def observe(point: GridPoint, rng: random.Random) -> list[float]:
    """A fresh measurement of ``point``: one trial's worth of its recorded samples, drawn with replacement."""
    return [rng.choice(point.samples) for _ in range(point.draws or len(point.samples))]


@dataclass
class Replay:
    """What one method did on one seed: each trial's point, and the point it would pick after each trial."""

    keys: list[str]
    picks: list[str]


def replay(method: Method, grid: Grid, space: SearchSpace, seed: int, budget: int) -> Replay:
    """Run ``method`` for at most ``budget`` trials; its pick after each trial is the best observed so far."""
    rng = random.Random(seed)
    run = Replay([], [])
    observed: dict[str, float] = {}

    def measure(point: GridPoint, trial: optuna.Trial | None) -> float | None:
        if len(run.keys) >= budget:
            raise _BudgetSpent
        samples = observe(point, rng)
        value: float | None = statistics.median(samples)
        if trial is not None:
            for step in range(len(samples)):
                trial.report(statistics.median(samples[:step + 1]), step)
                if run.keys and trial.should_prune():
                    value = None
                    break
        run.keys.append(point.key)
        if value is not None and value > observed.get(point.key, float("-inf")):
            observed[point.key] = value
        run.picks.append(max(observed, key=lambda key: observed[key]))
        return value

    with contextlib.suppress(_BudgetSpent):
        method(grid, space, rng, budget, measure)
    return run


class _BudgetSpent(Exception):
    pass


def _key_of(space: SearchSpace, params: dict[str, Any]) -> str:
    return space.config_from_params(params).key()


def _optuna_search(sampler: Callable[[int], optuna.samplers.BaseSampler], pruned: bool) -> Method:
    """An Optuna search as the tuner runs it (``pruned``: its pruner, and a configuration proposed again takes
    the earlier measurement and sends the next trial to an unmeasured neighbour, as tuner.search.Search does
    with tuner.study.RepeatPolicy), or plain."""
    def method(grid: Grid, space: SearchSpace, rng: random.Random, budget: int, measure: Measure) -> None:
        by_key = {p.key: p for p in grid.points}
        repeats = RepeatPolicy(limit=REPEAT_LIMIT if pruned else 0)
        with quiet_optuna():
            seed = rng.randrange(2**31)
            study = optuna.create_study(study_name=f"replay-{seed}", direction="maximize", sampler=sampler(seed),
                                        pruner=make_pruner() if pruned else optuna.pruners.NopPruner())
            study.enqueue_trial(space.baseline_params())
            while True:
                trial = study.ask()
                key = space.draw(trial).key()
                trial.set_user_attr("config_key", key)
                earlier = None if trial.number == 0 else repeats.earlier_measurement(study, key)
                if earlier is not None:
                    trial.set_user_attr(REPEAT_ATTR, earlier.number)
                    repeats.redirect(study, trial, space.neighbours(trial.params))
                    study.tell(trial, earlier.value)
                    continue
                value = measure(by_key[key], trial)
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    study.tell(trial, value)
    return method


def _grid_in_random_order(grid: Grid, space: SearchSpace, rng: random.Random, budget: int,
                          measure: Measure) -> None:
    rest = [p for p in grid.points if p.key != grid.baseline_key]
    rng.shuffle(rest)
    for point in (grid.point(grid.baseline_key), *rest):
        measure(point, None)


def _stage_wise(grid: Grid, space: SearchSpace, rng: random.Random, budget: int, measure: Measure) -> None:
    """llama-optimus' order: batch sizes first, then flash attention, then every other knob one at a time,
    each stage keeping the best value it saw and never measuring a configuration twice."""
    by_key = {p.key: p for p in grid.points}
    current = dict(space.baseline_params())
    best = measure(by_key[grid.baseline_key], None) or 0.0
    done = {grid.baseline_key}
    staged = {name for stage in STAGES for name in stage}
    names = sorted({name for p in grid.points for name in p.params})
    stages = [[n for n in stage if n in names] for stage in STAGES] + [[n] for n in names if n not in staged]
    for stage in filter(None, stages):
        for point in grid.points:
            others = (n for n in names if n not in stage and n in point.params and n in current)
            if point.key in done or any(point.params[n] != current[n] for n in others):
                continue
            done.add(point.key)
            value = measure(point, None)
            if value is not None and value > best:
                best, current = value, dict(point.params)


METHODS: dict[str, Method] = {
    "tuner (TPE + pruner)": _optuna_search(make_sampler, pruned=True),
    "random": _optuna_search(lambda seed: optuna.samplers.RandomSampler(seed=seed), pruned=False),
    "grid, random order": _grid_in_random_order,
    "stage-wise (llama-optimus)": _stage_wise,
}


@dataclass(frozen=True)
class MethodSummary:
    method: str
    seeds: int
    median_trials_to_within: float | None  # None: the median seed never came within WITHIN in the budget
    within_at_share: float  # share of seeds within WITHIN of the optimum after ``share`` of the grid's trials
    slower_than_baseline: float  # share of seeds whose pick at that point is truly slower than the baseline


def trials_to_within(run: Replay, grid: Grid, within: float = WITHIN) -> int | None:
    """Trials until the method's pick is truly within ``within`` of the grid's best, or None."""
    target = (1 - within) * grid.best_value
    values = {p.key: p.value for p in grid.points}
    return next((n for n, key in enumerate(run.picks, 1) if values[key] >= target), None)


def summarize_method(name: str, runs: Sequence[Replay], grid: Grid, share: float) -> MethodSummary:
    """Median trials to come within WITHIN of the optimum (over seeds), and how each seed stood after
    ``share`` of the grid's size in trials."""
    limit = max(1, round(share * len(grid.points)))
    counts = [trials_to_within(run, grid) for run in runs]
    ordered = sorted(float("inf") if c is None else float(c) for c in counts)
    median = statistics.median(ordered)
    baseline = grid.point(grid.baseline_key).value
    at_limit = [run.picks[min(limit, len(run.picks)) - 1] for run in runs if run.picks]
    return MethodSummary(
        method=name, seeds=len(runs), median_trials_to_within=None if median == float("inf") else median,
        within_at_share=sum(c is not None and c <= limit for c in counts) / len(runs),
        slower_than_baseline=sum(grid.point(key).value < baseline for key in at_limit) / len(runs),
    )


def replay_all(grid: Grid, space: SearchSpace, seeds: int, *, share: float = 0.2,
               methods: dict[str, Method] | None = None,
               on_replayed: Callable[[str, int], None] = lambda method, done: None) -> Iterator[MethodSummary]:
    """Every method over ``seeds`` seeds, each with the grid's size as its trial budget. ``on_replayed`` hears of
    each finished seed (the method and how many of its seeds are done): a replay takes minutes per method."""
    for name, method in (methods or METHODS).items():
        runs = []
        for seed in range(seeds):
            runs.append(replay(method, grid, space, seed, len(grid.points)))
            on_replayed(name, seed + 1)
        yield summarize_method(name, runs, grid, share)
