"""A faster token rate never hides a much slower start: the proof leaves out a candidate whose server took longer
than the load bound to come up, says so, and the result records both configurations' load times."""

from __future__ import annotations

import time
from typing import Any

import optuna
import pytest

from tuner.config import RunConfig
from tuner.pipeline import ProofSettings, verify_candidates
from tuner.result import assemble_result
from tuner.stats import StopRule
from tuner.study import BASELINE, ROLE_ATTR, load_limit, load_within
from tuner.summary import load_line
from tuner.trial.runner import TrialOutcome
from tuner.verify import Verification

BASE = RunConfig(threads=2, threads_batch=2)
QUICK = RunConfig(threads=1, threads_batch=1)  # a little faster, starts as fast as the baseline
SLOW_START = RunConfig(threads=2, threads_batch=2, repack=False)  # much faster tokens, a start 10x slower
SPEED = {BASE: 100.0, QUICK: 110.0, SLOW_START: 150.0}
LOAD_S = {BASE: 4.0, QUICK: 4.5, SLOW_START: 40.0}


def outcome_of(config: RunConfig, step: int = 0) -> TrialOutcome:
    value = SPEED[config] * (1.0 + 0.002 * (step % 3 - 1))
    return TrialOutcome(values=[value] * 5, series={"tg_tps": [value] * 5}, stop_reason="max-samples",
                        load_seconds=LOAD_S[config])


def study_with_trials() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for config, attrs in ((BASE, {ROLE_ATTR: BASELINE}), (SLOW_START, {}), (QUICK, {})):
        outcome = outcome_of(config)
        study.add_trial(optuna.trial.create_trial(
            value=SPEED[config], user_attrs={"config": config.to_dict(), "config_key": config.key(),
                                             "outcome": outcome.to_dict(), **attrs}))
    return study


class Machine:
    def __init__(self) -> None:
        self.runs: list[RunConfig] = []

    def run(self, config: RunConfig, label: str, **_: Any) -> TrialOutcome:
        self.runs.append(config)
        return outcome_of(config, len(self.runs))


class Events:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def event(self, text: str) -> None:
        self.lines.append(text)

    def update(self, text: str) -> None:
        pass


def test_the_limit_is_a_factor_of_the_baselines_load_and_never_less_than_the_slack() -> None:
    assert load_limit(4.0, 3.0) == pytest.approx(12.0)
    assert load_limit(0.4, 3.0) == pytest.approx(5.4), "a sub-second start may take a few seconds more"
    assert load_limit(4.0, 0.0) is None and load_limit(None, 3.0) is None
    within = load_within(study_with_trials(), 3.0)
    assert within is not None
    assert [within(t) for t in study_with_trials().trials] == [True, False, True]


def verified(factor: float) -> tuple[Verification, Machine, Events]:
    machine, events = Machine(), Events()
    proof = ProofSettings(stop=StopRule(), samples=5, max_load_factor=factor)
    verification = verify_candidates(study_with_trials(), BASE, machine, events,  # type: ignore[arg-type]
                                     time.monotonic() + 3600, 1.0, 2, proof)
    return verification, machine, events


def test_a_candidate_that_starts_ten_times_slower_is_left_out_of_the_proof_and_said_so() -> None:
    verification, machine, events = verified(3.0)
    assert SLOW_START not in machine.runs, "the slow starter is never re-measured"
    assert verification.winner is not None and verification.winner.config == QUICK
    assert any("trial 1 is left out of the proof" in line and "40.0 s" in line and "4.0 s" in line
               for line in events.lines), events.lines
    # without the bound the faster-token, slower-start configuration would have won
    unbounded, machine, _ = verified(0.0)
    assert SLOW_START in machine.runs and unbounded.winner is not None and unbounded.winner.config == SLOW_START


def test_the_result_records_and_shows_both_load_times() -> None:
    verification, _, _ = verified(3.0)
    result = assemble_result(kind="benchmark", study="s", study_trials=3, objective="tg", unit="tok/s",
                             verification=verification, host={}, model={}, workload={}, server=None, search={},
                             wall_seconds=10.0, measuring_seconds=5.0, roofline=None, baseline_name="defaults")
    assert result.baseline["load_seconds"] == pytest.approx(4.0)
    assert result.chosen["load_seconds"] == pytest.approx(4.5)
    assert load_line(result) == "baseline 4.0 s   chosen 4.5 s (x1.12)"
