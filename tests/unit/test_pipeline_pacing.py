"""The steps every run shares (tuner.pipeline.search_and_prove), with the part a live server brings: its pacing,
the restart cap's wait, which may end the search early and must never end the proof.

Real Optuna studies, the real Search and proof; the measurer answers at once (FakeMeasurer: a clear optimum).
"""

from __future__ import annotations

import time

import optuna
from model_support import a_model
from test_search_repeats import HOST
from test_tune_pipeline import FakeMeasurer, flash_attention_wins

from tuner.pipeline import ProofSettings, Proven, RunSteps, search_and_prove
from tuner.probe import read_host
from tuner.progress import TuneProgress
from tuner.search import Search
from tuner.space import SearchSpace
from tuner.stats import StopRule
from tuner.study import is_baseline, quiet_optuna

BUDGET_S = 600.0


class CappedRestarts:
    """A restart cap that lets ``free`` configuration changes through and then holds the next one back for an hour,
    noting the deadline the search gave it each time it was asked."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.deadline: float | None = None
        self.deadlines_seen: list[float | None] = []
        self.held_back = 0

    def restart_wait_s(self) -> float:
        self.deadlines_seen.append(self.deadline)
        return 0.0 if len(self.deadlines_seen) <= self.free else 3600.0

    def hold_back_search(self) -> str:
        self.held_back += 1
        return "the test's cap allows no further trial"


def run_steps(steps: RunSteps, pacing: CappedRestarts | None) -> tuple[optuna.Study, list[str], Proven]:
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    with quiet_optuna():
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=3))
    events: list[str] = []
    with TuneProgress(BUDGET_S, title="pipeline") as progress:
        progress.event = events.append  # type: ignore[method-assign,assignment]
        search = Search(study, space, FakeMeasurer(flash_attention_wins), progress, unit="tok/s")
        proven = search_and_prove(search, ProofSettings(stop=StopRule(), samples=5), steps,
                                  started=time.monotonic(), budget_s=BUDGET_S, pacing=pacing)
    return study, events, proven


def test_the_restart_cap_ends_the_search_with_time_left_and_the_proof_still_runs() -> None:
    pacing = CappedRestarts(free=3)
    study, events, proven = run_steps(RunSteps("the deployed configuration", "-", candidates=2), pacing)
    searched = [t for t in study.get_trials(deepcopy=False) if not is_baseline(t)]
    assert len(searched) == 3, "one trial per change the cap let through, then none"
    assert pacing.held_back == 1 and "the search ends: the test's cap allows no further trial" in events
    *while_searching, after = pacing.deadlines_seen
    search_end = while_searching[0]
    assert search_end is not None and set(while_searching) == {search_end}, "no wait runs into the proof's part"
    assert after == pacing.deadline and after is not None and after > search_end, "the proof's waits may use its part"
    assert proven.verification.rounds >= 3 and proven.verification.candidates


def test_a_benchmark_pays_nothing_for_a_change_and_runs_the_trials_asked_for() -> None:
    study, events, proven = run_steps(RunSteps("llama.cpp's defaults", "-", candidates=2, trials=5), None)
    assert sum(not is_baseline(t) for t in study.get_trials(deepcopy=False)) == 5
    assert not any("cap" in line for line in events)
    assert proven.verification.rounds >= 3


def test_without_a_search_the_study_s_candidates_are_proven_and_nothing_is_searched() -> None:
    pacing = CappedRestarts(free=0)
    study, _, proven = run_steps(RunSteps("the deployed configuration", "-", candidates=2, searching=False), pacing)
    assert [is_baseline(t) for t in study.get_trials(deepcopy=False)] == [True]
    assert pacing.deadlines_seen == [] and pacing.held_back == 0
    assert proven.plan.searching is False
