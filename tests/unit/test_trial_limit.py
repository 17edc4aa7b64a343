"""``--trials``: the search stops after the trials asked for, long before its budget, and the baseline a run
measures (or finds in a resumed study) is not one of them (tuner.search.Search.run_until, which counts
the trials of its own call; the option itself in tuner.commands.options).

Real Optuna studies and the real Search; the measurer answers at once (tests/unit/test_search_repeats.py)."""

from __future__ import annotations

import argparse
import time

import optuna
import pytest
from model_support import a_model
from optuna.trial import TrialState
from test_search_repeats import HOST, CountingMeasurer, a_study

from tuner.commands.options import trials_limit
from tuner.errors import UserError
from tuner.pipeline import measure_baseline
from tuner.probe import read_host
from tuner.progress import TuneProgress
from tuner.search import Search
from tuner.space import SearchSpace
from tuner.study import NEIGHBOUR_ATTR, REPEAT_ATTR, enqueue_baseline, is_baseline

FAR = 3600.0


def run_with_cap(study: optuna.Study, trials: int | None, *, seconds: float = FAR) -> tuple[Search, CountingMeasurer]:
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    measurer = CountingMeasurer()
    with TuneProgress(600, title="trials") as progress:
        search = Search(study, space, measurer, progress, unit="tok/s")
        end = time.monotonic() + seconds
        measure_baseline(search, end, baseline_name="defaults", fix="-")
        search.run_until(lambda: end, lambda: 0.0 if seconds == FAR else 1.0,
                         max_trials=trials)
    return search, measurer


def test_the_search_stops_after_the_trials_asked_for_the_baseline_not_counted() -> None:
    study = a_study()
    search, _ = run_with_cap(study, 3)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and is_baseline(trials[0]) and not any(map(is_baseline, trials[1:]))
    assert search.report.trials_run == 4 and search.report.trial_limit_reached


def test_a_resumed_study_runs_the_trials_asked_for_and_keeps_its_baseline() -> None:
    study = a_study()
    run_with_cap(study, 2)
    search, measurer = run_with_cap(study, 2)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 5 and sum(map(is_baseline, trials)) == 1
    assert search.report.trials_run == 2 and search.report.trial_limit_reached
    assert len(measurer.configs) <= 2, "the kept baseline is not measured again (a repeat is not measured at all)"


def test_a_repeat_as_the_last_trial_asked_for_leaves_no_neighbour_queued_behind() -> None:
    """A repeat enqueues an unmeasured neighbour for the next trial (tuner.study.RepeatPolicy.redirect), but the
    last trial --trials allows has no next trial: the study holds the trials asked for and none waiting."""
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    other = {**space.baseline_params(), "threads": 1}
    study = a_study()
    enqueue_baseline(study, space.baseline_params(), None)
    study.enqueue_trial(other)
    study.enqueue_trial(other)  # trial 2 proposes trial 1's configuration again: the last one of the two asked for
    run_with_cap(study, 2)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * 3, states
    assert REPEAT_ATTR in study.trials[2].user_attrs

    study = a_study()
    enqueue_baseline(study, space.baseline_params(), None)
    study.enqueue_trial(other)
    study.enqueue_trial(other)
    run_with_cap(study, 3)  # a trial follows the repeat: it measures the neighbour
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert trials[3].user_attrs[NEIGHBOUR_ATTR] == trials[2].number


def test_without_a_limit_only_the_budget_ends_the_search() -> None:
    study = a_study()
    search, _ = run_with_cap(study, None, seconds=0.5)  # the time left is shorter than a trial at once
    assert search.report.trials_run == 1 and not search.report.trial_limit_reached


@pytest.mark.parametrize("given", [0, -3])
def test_a_limit_below_one_is_refused_with_the_fix(given: int) -> None:
    with pytest.raises(UserError) as refused:
        trials_limit(argparse.Namespace(trials=given))
    assert f"got {given}" in str(refused.value) and "--trials 20" in refused.value.fix


def test_no_limit_and_a_positive_one_pass_as_given() -> None:
    assert trials_limit(argparse.Namespace(trials=None)) is None
    assert trials_limit(argparse.Namespace()) is None  # `apply` has no --trials
    assert trials_limit(argparse.Namespace(trials=5)) == 5
