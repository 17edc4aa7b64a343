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
from tuner.study import (
    NEIGHBOUR_ATTR,
    REPEAT_ATTR,
    RepeatPolicy,
    best_trials,
    enqueue_baseline,
    is_baseline,
    quiet_optuna,
)
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


def differing(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {name for name in a.keys() | b.keys() if a.get(name) != b.get(name)}


def test_the_neighbours_of_a_configuration_are_one_knob_away_distinct_and_drawable() -> None:
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    origin = {**space.baseline_params(), "flash_attn": "off", "threads": 1}
    origin.pop("cache_type_v", None)  # flash attention off: no V cache type to choose
    neighbours = space.neighbours(origin)
    keys = [key for key, _ in neighbours]
    assert len(set(keys)) == len(keys) and space.config_from_params(origin).key() not in keys
    for key, params in neighbours:
        assert space.config_from_params(params).key() == key, "each neighbour is exactly what its draw gives"
        moved = differing(origin, params)
        assert len(moved - {"cache_type_v"}) == 1, moved  # one knob, and what flash attention brings in
    by_moved = {frozenset(differing(origin, p)): p for _, p in neighbours}
    assert by_moved[frozenset({"threads"})]["threads"] == 2  # the 2-CPU host: one step up, none down
    turned_on = by_moved[frozenset({"flash_attn", "cache_type_v"})]
    assert turned_on["flash_attn"] == "on" and turned_on["cache_type_v"] == space.baseline_params()["cache_type_v"]
    assert {frozenset(m) for m in by_moved} >= {frozenset({"load_mode"}), frozenset({"placement"}),
                                                frozenset({"cache_type_k"})}


def test_a_repeat_sends_the_next_trial_to_an_unmeasured_neighbour_of_what_was_proposed() -> None:
    """The sampler proposing a measured configuration again is a sign it believes in that region: the next
    trial measures a configuration one knob from it that no trial has had, not another repeat."""
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    with quiet_optuna():
        study = optuna.create_study(direction="maximize", study_name="neighbours")
    enqueue_baseline(study, space.baseline_params(), None)
    other = {**space.baseline_params(), "threads": 1}
    study.enqueue_trial(other)
    study.enqueue_trial(other)
    measurer = CountingMeasurer()
    with TuneProgress(600, title="repeats") as progress:
        search = Search(study, space, measurer, progress, unit="tok/s")
        trials = [search.run_one() for _ in range(4)]
    assert all(t is not None for t in trials)
    repeat, neighbour = trials[2], trials[3]
    assert repeat is not None and neighbour is not None and REPEAT_ATTR in repeat.user_attrs
    assert neighbour.user_attrs[NEIGHBOUR_ATTR] == repeat.number and REPEAT_ATTR not in neighbour.user_attrs
    assert len(measurer.configs) == 3 and measurer.configs[-1].key() == neighbour.user_attrs["config_key"]
    assert len(differing(neighbour.params, repeat.params) - {"cache_type_v"}) == 1
    assert neighbour.user_attrs["config_key"] not in {t.user_attrs["config_key"] for t in trials[:3] if t}


def test_a_neighbour_is_picked_reproducibly_and_none_once_every_neighbour_was_tried() -> None:
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    origin = {**space.baseline_params(), "threads": 1}
    neighbours = space.neighbours(origin)
    picks = []
    for _ in range(2):
        with quiet_optuna():
            study = optuna.create_study(direction="maximize", study_name="same-name")
        repeated = study.ask()
        picks.append(RepeatPolicy.redirect(study, repeated, neighbours))
    assert picks[0] is not None and picks[0] == picks[1], "same study, same trial: same neighbour"
    study = a_study()
    for key, _ in neighbours[1:]:
        completed(study, key, 1.0)
    repeated = study.ask()
    assert RepeatPolicy.redirect(study, repeated, neighbours) == neighbours[0][0], "the only one left"
    assert study.get_trials(states=(TrialState.WAITING,))[0].user_attrs["config_key"] == neighbours[0][0]
    assert RepeatPolicy.redirect(study, repeated, neighbours) is None, "enqueued counts as tried"
