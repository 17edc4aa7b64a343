"""Three rows of the fault table (docs/reliability.md) about the study: a baseline that cannot be measured, a
stale-trial check that fails, and a run killed while it created its study.

Each runs the real code on a real SQLite study store in ``tmp_path``; the only fakes are the measurer (a trial that
fails with a reason, as llama.cpp failing would) and one failing statement on the store's engine.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from model_support import a_model
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy import exc as sqlalchemy_exc

from tuner.config import RunConfig
from tuner.errors import TrialFailed, UserError
from tuner.fleet.worker import StaleTrialWatch
from tuner.pipeline import measure_baseline
from tuner.probe import read_host
from tuner.progress import TuneProgress
from tuner.search import Search
from tuner.space import SearchSpace
from tuner.study import StudyBinding, is_baseline, open_storage, open_study
from tuner.trial.runner import TrialOutcome

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "epyc-kvm-2vcpu"
BINDING = StudyBinding(host_fingerprint="0123456789abcdef", model_sha256="ab" * 32, objective="tg",
                       workload={"pp_tokens": 512, "tg_tokens": 128, "seed": 1234}, extra={"hostname": "night-host"})
FIX = "read the trial logs in /logs/night"


def a_space() -> SearchSpace:
    return SearchSpace(read_host(HOST), a_model(), "tg")


def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


class ScriptedMeasurer:
    """Fails one run per reason given, in turn, as a llama.cpp worker that dies would; then measures instantly."""

    measuring_seconds = 0.0

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.configs: list[RunConfig] = []

    def run(self, config: RunConfig, label: str, **_: Any) -> TrialOutcome:
        self.configs.append(config)
        if self.failures:
            raise TrialFailed(self.failures.pop(0))
        return TrialOutcome(values=[10.0, 11.0, 12.0], wall_seconds=1.0)


def measure(study: optuna.Study, space: SearchSpace, measurer: ScriptedMeasurer) -> FrozenTrial:
    with TuneProgress(600, title="night") as progress:
        search = Search(study, space, measurer, progress, unit="tok/s")
        return measure_baseline(search, time.monotonic() + 3600, baseline_name="llama.cpp's defaults", fix=FIX)


def test_a_baseline_that_fails_twice_ends_the_run_with_its_reason_and_the_study_is_kept(tmp_path: Path) -> None:
    space = a_space()
    study, created = open_study("night", open_storage(store_url(tmp_path)), BINDING,
                                baseline_params=space.baseline_params())
    assert created
    measurer = ScriptedMeasurer("llama-server ran out of memory", "llama-server exited with code 1")
    with pytest.raises(UserError) as refused:
        measure(study, space, measurer)
    assert refused.value.problem == ("the baseline configuration (llama.cpp's defaults) could not be measured: "
                                     "llama-server exited with code 1")
    assert refused.value.fix == FIX
    assert measurer.configs == [space.baseline()] * 2, "the baseline, and only it, was tried twice"

    # the next run opens the same study from the store: both failures are recorded, nothing else is queued
    again, created = open_study("night", open_storage(store_url(tmp_path)), BINDING,
                                baseline_params=space.baseline_params())
    assert not created and again._study_id == study._study_id
    kept = again.get_trials(deepcopy=False)
    assert [(t.state, is_baseline(t), t.user_attrs.get("failure")) for t in kept] == [
        (TrialState.FAIL, True, "llama-server ran out of memory"),
        (TrialState.FAIL, True, "llama-server exited with code 1"),
    ]
    assert again.user_attrs == BINDING.attrs()
    # and resumes it: the baseline is queued once more and measured as the study's third trial
    base = measure(again, space, ScriptedMeasurer())
    assert (base.number, base.state, is_baseline(base)) == (2, TrialState.COMPLETE, True)
    assert len(again.get_trials(deepcopy=False)) == 3


def test_a_baseline_that_fails_once_is_measured_again(tmp_path: Path) -> None:
    """The other side of "fails twice": one failure with budget left is tried again, not the end of the run."""
    space = a_space()
    study, _ = open_study("night", open_storage(store_url(tmp_path)), BINDING, baseline_params=space.baseline_params())
    measurer = ScriptedMeasurer("llama-server exited with code 1")
    base = measure(study, space, measurer)
    assert (base.number, base.state, is_baseline(base)) == (1, TrialState.COMPLETE, True)
    assert measurer.configs == [space.baseline()] * 2
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_stale_trial_check_that_fails_is_a_warning_and_the_next_check_fails_the_stale_trial(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The watch's first check hits a database error (not an outage: nothing to wait out); it warns, and its next
    check fails the dead worker's trial and re-queues it, as the store's callback does."""
    storage = open_storage(store_url(tmp_path))
    study = optuna.create_study(study_name="night", storage=storage, direction="maximize")
    dead = storage.create_new_trial(study._study_id)  # a killed worker's trial: RUNNING, its heartbeat long ago
    storage.record_heartbeat(dead)
    with storage.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00.000000'")
    failed: list[str] = []

    def hiccup(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if threading.current_thread().name == "stale-trial-watch" and not failed:
            failed.append(statement)
            raise sqlalchemy_exc.DatabaseError(statement, {}, Exception("database disk image is malformed"))

    event.listen(storage.engine, "before_cursor_execute", hiccup)
    try:
        with StaleTrialWatch("night", storage, interval_s=0.05):
            give_up = time.monotonic() + 10
            while storage.get_trial(dead).state == TrialState.RUNNING and time.monotonic() < give_up:
                time.sleep(0.02)
    finally:
        event.remove(storage.engine, "before_cursor_execute", hiccup)
    assert len(failed) == 1, "the first check did not reach the store"
    err = capsys.readouterr().err
    assert err.count("llamahost: warning: stale-trial check failed: ") == 1, err
    assert "database disk image is malformed" in err, "the warning names the database's own error"
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING], "the next check did not run"
    assert trials[1].system_attrs["failed_trial"] == trials[0].number


def killed_while_creating(storage: RDBStorage, *, bound: int) -> int:
    """The study as open_study leaves it when its run is killed after the first write (the study) and ``bound``
    of its binding's attributes (one write each), before the baseline is queued; its id."""
    study = optuna.create_study(study_name="night", storage=storage, direction="maximize")
    for key, value in list(BINDING.attrs().items())[:bound]:
        study.set_user_attr(key, value)
    return study._study_id


@pytest.mark.parametrize("bound", [0, 1, len(BINDING.attrs())],
                         ids=["before binding", "while binding", "before queuing the baseline"])
def test_a_study_left_by_a_run_killed_while_creating_it_is_adopted_and_gets_one_baseline(
        tmp_path: Path, bound: int) -> None:
    space = a_space()
    study_id = killed_while_creating(open_storage(store_url(tmp_path)), bound=bound)
    for run in ("the next run", "the one after"):
        storage = open_storage(store_url(tmp_path))
        study, created = open_study("night", storage, BINDING, baseline_params=space.baseline_params())
        assert study._study_id == study_id, f"{run} made another study"
        assert created == (bound < len(BINDING.attrs()) and run == "the next run"), run
        assert [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)] == ["night"]
        assert study.user_attrs == BINDING.attrs()
        trials = study.get_trials(deepcopy=False)
        assert [(t.state, is_baseline(t), t.system_attrs.get("fixed_params")) for t in trials] == [
            (TrialState.WAITING, True, space.baseline_params())], f"{run}: the baseline is queued exactly once"


def test_an_empty_study_that_minimizes_is_not_adopted(tmp_path: Path) -> None:
    """An empty study made by another program is taken over only when it maximizes, as llamahost's do: one that
    minimizes would search for the slowest configuration."""
    optuna.create_study(study_name="night", storage=open_storage(store_url(tmp_path)), direction="minimize")
    with pytest.raises(UserError, match="'night' was not made by llamahost"):
        open_study("night", open_storage(store_url(tmp_path)), BINDING, baseline_params=a_space().baseline_params())
    study = optuna.load_study(study_name="night", storage=open_storage(store_url(tmp_path)))
    assert study.user_attrs == {} and study.get_trials() == []
