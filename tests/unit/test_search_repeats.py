"""A configuration the sampler proposes again takes the earlier measurement instead of a new one
(tuner.study.RepeatPolicy, used by tuner.search.Search and by the replay in tuner.search_grid).

Real Optuna studies and the real Search; the only fake is the measurer, which counts what it is asked to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from model_support import a_model
from optuna.trial import TrialState

from tuner.config import RunConfig
from tuner.probe import read_host
from tuner.progress import TuneProgress
from tuner.search import Search
from tuner.space import SearchSpace
from tuner.study import REPEAT_ATTR, RepeatPolicy, best_trials, enqueue_baseline, is_baseline, quiet_optuna
from tuner.trial.runner import TrialOutcome

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "epyc-kvm-2vcpu"


class CountingMeasurer:
    """Measures instantly: the n-th run reads 10 + n tok/s, so a reused value is told apart from a new one."""

    measuring_seconds = 0.0

    def __init__(self) -> None:
        self.configs: list[RunConfig] = []

    def run(self, config: RunConfig, label: str, **_: Any) -> TrialOutcome:
        self.configs.append(config)
        value = 10.0 + len(self.configs)
        return TrialOutcome(values=[value, value, value], wall_seconds=1.0)


def a_study() -> optuna.Study:
    with quiet_optuna():
        return optuna.create_study(direction="maximize")


def test_a_configuration_proposed_again_takes_the_earlier_measurement_and_is_not_measured() -> None:
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    study = a_study()
    enqueue_baseline(study, space.baseline_params(), None)
    other = {**space.baseline_params(), "threads": 1}
    for _ in range(3):  # the sampler proposing one configuration three times
        study.enqueue_trial(other)
    measurer = CountingMeasurer()
    with TuneProgress(600, title="repeats") as progress:
        search = Search(study, space, measurer, progress, unit="tok/s")
        trials = [search.run_one() for _ in range(4)]
    assert len(measurer.configs) == 2, "the baseline and the new configuration, each once"
    baseline, first, *again = trials
    assert baseline is not None and first is not None
    assert first.value == 12.0 and REPEAT_ATTR not in first.user_attrs
    for trial in again:
        assert trial is not None and trial.state == TrialState.COMPLETE and trial.value == 12.0
        assert trial.user_attrs[REPEAT_ATTR] == first.number  # the measured trial, not the repeat before it
        assert trial.user_attrs["summary"] == first.user_attrs["summary"]
    assert (search.report.trials_run, search.report.complete, search.report.repeats) == (4, 4, 2)
    assert [t.number for t in best_trials(study, 3)] == [first.number], "one candidate per configuration"


def test_the_baselines_configuration_proposed_by_the_sampler_takes_its_measurement_but_not_its_role() -> None:
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    study = a_study()
    enqueue_baseline(study, space.baseline_params(), None)
    study.enqueue_trial(space.baseline_params())  # the sampler proposing the baseline's configuration
    measurer = CountingMeasurer()
    with TuneProgress(600, title="repeats") as progress:
        search = Search(study, space, measurer, progress, unit="tok/s")
        baseline, again = search.run_one(), search.run_one()
    assert baseline is not None and again is not None and len(measurer.configs) == 1
    assert is_baseline(baseline) and not is_baseline(again) and again.user_attrs[REPEAT_ATTR] == baseline.number
    assert again.user_attrs["summary"] == baseline.user_attrs["summary"]


def test_the_baseline_proposed_again_is_measured_again() -> None:
    """The baseline is the reference every candidate is compared with: it is never answered from the store."""
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    study = a_study()
    for _ in range(2):
        enqueue_baseline(study, space.baseline_params(), None)
    measurer = CountingMeasurer()
    with TuneProgress(600, title="repeats") as progress:
        search = Search(study, space, measurer, progress, unit="tok/s")
        search.run_one()
        search.run_one()
    assert len(measurer.configs) == 2 and search.report.repeats == 0


def completed(study: optuna.Study, key: str, value: float, **attrs: Any) -> int:
    trial = study.ask()
    trial.set_user_attr("config_key", key)
    for name, attr in attrs.items():
        trial.set_user_attr(name, attr)
    study.tell(trial, value)
    return trial.number


def test_only_so_many_proposals_in_a_row_take_an_earlier_measurement() -> None:
    study = a_study()
    measured = completed(study, "a", 1.0)
    policy = RepeatPolicy(limit=3)
    answers = [policy.earlier_measurement(study, "a") for _ in range(5)]
    assert [None if t is None else t.number for t in answers] == [measured, measured, measured, None, measured]


def test_pruned_failed_and_unknown_configurations_are_measured_and_the_latest_measurement_is_taken() -> None:
    study = a_study()
    pruned = study.ask()
    pruned.set_user_attr("config_key", "p")
    study.tell(pruned, state=TrialState.PRUNED)
    failed = study.ask()
    failed.set_user_attr("config_key", "f")
    study.tell(failed, state=TrialState.FAIL)
    completed(study, "a", 1.0)
    latest = completed(study, "a", 2.0)
    completed(study, "a", 2.0, **{REPEAT_ATTR: latest})
    policy = RepeatPolicy()
    assert policy.earlier_measurement(study, "p") is None
    assert policy.earlier_measurement(study, "f") is None
    assert policy.earlier_measurement(study, "new") is None
    earlier = policy.earlier_measurement(study, "a")
    assert earlier is not None and earlier.number == latest
