"""The exhaustive grid is exactly the space the tuner samples, and the replay harness scores search methods the
way issue 19 asks: trials to come within 2% of the grid's best, and how often a method ends truly slower than
the baseline. The grid here is small and recorded by hand, with a known optimum."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest
from model_support import a_model

from tuner.probe import read_host
from tuner.search_grid import (
    METHODS,
    Grid,
    GridPoint,
    Measure,
    Replay,
    grid_params,
    observe,
    replay,
    replay_all,
    summarize_method,
    trials_to_within,
)
from tuner.space import SearchSpace
from tuner.study import quiet_optuna

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "epyc-kvm-2vcpu"


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace(read_host(HOST), a_model(), "tg")


def test_the_grid_is_every_configuration_the_tuner_can_draw_and_nothing_else(space: SearchSpace) -> None:
    points = grid_params(space)
    keys = [space.config_from_params(params).key() for params in points]
    assert len(keys) == len(set(keys)) > 20
    assert space.baseline().key() in keys
    drawn = set()
    with quiet_optuna():
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(3000):
            trial = study.ask()
            drawn.add(space.draw(trial).key())
            study.tell(trial, 0.0)
    assert drawn == set(keys), "random draws reach every grid point and none outside it"


def speed(params: dict[str, Any]) -> float:
    """A made-up host: two threads, flash attention and a q8_0 K cache help; the rest barely matters."""
    value = 100.0 if params.get("threads") == 2 else 60.0
    value *= {"on": 1.10, "auto": 1.0, "off": 0.9}[params["flash_attn"]]
    value *= 1.05 if params.get("cache_type_k") == "q8_0" else 1.0
    return value * (1.005 if params.get("placement") == "compact" else 1.0)


def recorded_grid(space: SearchSpace) -> Grid:
    points = []
    for params in grid_params(space):
        value = speed(params)
        points.append(GridPoint(params, space.config_from_params(params).key(),
                                tuple(value * f for f in (0.99, 0.995, 1.0, 1.005, 1.01))))
    return Grid(tuple(points), space.baseline().key())


def test_a_method_that_sees_every_point_always_comes_within_two_percent(space: SearchSpace) -> None:
    grid = recorded_grid(space)
    for seed in range(5):
        run = replay(METHODS["grid, random order"], grid, space, seed, len(grid.points))
        assert sorted(run.keys) == sorted(p.key for p in grid.points)
        reached = trials_to_within(run, grid)
        assert reached is not None and reached <= len(grid.points)
        assert grid.point(run.picks[-1]).value >= 0.98 * grid.best_value


def test_stage_wise_finds_the_optimum_of_a_separable_host_in_few_trials(space: SearchSpace) -> None:
    grid = recorded_grid(space)
    run = replay(METHODS["stage-wise (llama-optimus)"], grid, space, 0, len(grid.points))
    assert run.keys[0] == grid.baseline_key and len(run.keys) == len(set(run.keys)) < len(grid.points) / 2
    assert grid.point(run.picks[-1]).value >= 0.98 * grid.best_value


def test_every_method_is_scored_and_the_budget_caps_each_replay(space: SearchSpace) -> None:
    grid = recorded_grid(space)
    heard: list[tuple[str, int]] = []
    summaries = {s.method: s for s in replay_all(grid, space, seeds=3,
                                                 on_replayed=lambda method, done: heard.append((method, done)))}
    assert set(summaries) == set(METHODS)
    assert heard == [(method, done) for method in METHODS for done in (1, 2, 3)], "each seed is reported, in order"
    for summary in summaries.values():
        assert summary.seeds == 3 and 0 <= summary.within_at_share <= 1 and summary.slower_than_baseline == 0
    run = replay(METHODS["random"], grid, space, 0, 7)
    assert len(run.keys) == len(run.picks) == 7


def test_noise_can_make_a_method_end_truly_slower_than_the_baseline(space: SearchSpace) -> None:
    """A point whose true speed is half the baseline's but that sometimes measures fast: picked on some seeds."""
    baseline = GridPoint({"flash_attn": "auto"}, "base", (10.0, 10.0, 10.0))
    trap = GridPoint({"flash_attn": "on"}, "trap", (5.0, 5.0, 50.0))
    best = GridPoint({"flash_attn": "off"}, "best", (12.0, 12.0, 12.0))
    grid = Grid((baseline, trap, best), "base")

    def trap_first(grid: Grid, space: SearchSpace, rng: random.Random, budget: int, measure: Measure) -> None:
        for point in grid.points:
            measure(point, None)

    runs = [replay(trap_first, grid, space, seed, 3) for seed in range(40)]
    summary = summarize_method("trap first", runs, grid, share=2 / 3)  # judged after two trials
    trapped = sum(run.picks[1] == "trap" for run in runs) / len(runs)
    assert summary.slower_than_baseline == pytest.approx(trapped) and 0 < trapped < 1
    assert summary.median_trials_to_within == 3 and summary.within_at_share == 0


def test_trials_to_within_reads_the_picks_against_the_true_values() -> None:
    grid = Grid((GridPoint({}, "a", (10.0,)), GridPoint({}, "b", (9.9,)), GridPoint({}, "c", (5.0,))), "c")
    assert trials_to_within(Replay(["c", "b", "a"], ["c", "b", "b"]), grid) == 2  # 9.9 is within 2% of 10
    assert trials_to_within(Replay(["c"], ["c"]), grid) is None
    assert statistics.median(p.value for p in grid.points) == 9.9
    with pytest.raises(ValueError, match="baseline"):
        Grid((GridPoint({}, "a", (1.0,)),), "missing")


def test_a_point_recorded_in_passes_is_valued_on_the_pool_but_observed_one_trial_at_a_time() -> None:
    """Three passes read a point in three minutes; a replayed trial still takes one pass's samples, so pooling
    makes the grid's values steadier without making each trial more precise than the tuner's."""
    record = {"params": {}, "key": "a", "passes": [[10.0, 10.0, 10.0], [13.0, 13.0, 13.0], [12.0, 12.0]],
              "samples": [10.0, 10.0, 10.0, 13.0, 13.0, 13.0, 12.0, 12.0]}
    point = GridPoint.from_record(record)
    assert point.value == 12.0 and point.draws == 3
    assert len(observe(point, random.Random(0))) == 3
    one_pass = GridPoint.from_record({"params": {}, "key": "b", "samples": [1.0, 2.0, 3.0, 4.0]})
    assert one_pass.draws == 4 and len(observe(one_pass, random.Random(0))) == 4
