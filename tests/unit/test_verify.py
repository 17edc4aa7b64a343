"""The verification decision, driven by a deterministic stand-in for the measuring worker.

The decision logic (interleaving, exclusion of flaky candidates, Bonferroni, A/A) is pure; the stand-in
returns throughputs from a seeded distribution so each property can be checked exactly. Real workers are
exercised in tests/tuner/.
"""

from __future__ import annotations

import random

import pytest

from tuner.config import RunConfig
from tuner.errors import TrialFailed
from tuner.proof_defaults import MIN_ROUNDS
from tuner.trial.runner import TrialOutcome
from tuner.verify import plan_rounds, verify

BASE = RunConfig(threads=4, threads_batch=4)
FAST = RunConfig(threads=3, threads_batch=3)
SAME = RunConfig(threads=4, threads_batch=4, flash_attn="on")
FLAKY = RunConfig(threads=2, threads_batch=2)


class Machine:
    """Each configuration has a true speed; every run is that times shared-machine noise."""

    def __init__(self, speeds: dict[RunConfig, float], *, noise: float = 0.03, seed: int = 0,
                 fail: set[RunConfig] | None = None) -> None:
        self.speeds = speeds
        self.noise = noise
        self.rng = random.Random(seed)
        self.fail = fail or set()
        self.order: list[str] = []

    def run(self, config: RunConfig, label: str) -> TrialOutcome:
        self.order.append(label)
        if config in self.fail and len(self.order) > 3:
            raise TrialFailed("worker killed by SIGKILL")
        value = self.speeds[config] * self.rng.gauss(1.0, self.noise)
        return TrialOutcome(values=[value] * 5, series={"tg_tps": [value] * 5}, stop_reason="max-samples")


def test_a_clearly_faster_candidate_wins() -> None:
    machine = Machine({BASE: 100.0, FAST: 115.0, SAME: 100.0})
    result = verify(BASE, [("fast", FAST, 1), ("same", SAME, 2)], machine.run, rounds=5)
    assert result.winner is not None and result.winner.label == "fast"
    assert result.winner.comparison is not None and result.winner.comparison.ci_low > 1.0
    assert len(result.baseline.round_values) == 5


def test_identical_configurations_never_win_in_a_a_runs() -> None:
    winners = 0
    for seed in range(60):
        machine = Machine({BASE: 100.0, SAME: 100.0}, seed=seed, noise=0.05)
        winners += verify(BASE, [("same", SAME, 1)], machine.run, rounds=5, seed=seed).winner is not None
    assert winners <= 3  # alpha = 5%, and the 1% minimum effect on top


def test_rounds_are_interleaved_and_shuffled() -> None:
    machine = Machine({BASE: 100.0, FAST: 110.0, SAME: 100.0})
    verify(BASE, [("fast", FAST, 1), ("same", SAME, 2)], machine.run, rounds=4, seed=3)
    rounds = [machine.order[i:i + 3] for i in range(0, 12, 3)]
    for number, labels in enumerate(rounds):
        assert sorted(label.split("-", 2)[2] for label in labels) == ["baseline", "fast", "same"]
        assert all(label.startswith(f"verify-r{number}-") for label in labels)
    assert len({tuple(label.split("-", 2)[2] for label in r) for r in rounds}) > 1, "order never shuffled"


def test_a_candidate_that_fails_once_is_out() -> None:
    machine = Machine({BASE: 100.0, FLAKY: 150.0, SAME: 100.0}, fail={FLAKY})
    result = verify(BASE, [("flaky", FLAKY, 1), ("same", SAME, 2)], machine.run, rounds=4)
    flaky = next(a for a in result.candidates if a.label == "flaky")
    assert flaky.failure is not None and flaky.comparison is None
    assert result.winner is None


def test_a_failing_baseline_is_an_error() -> None:
    machine = Machine({BASE: 100.0, FAST: 110.0}, fail={BASE})
    with pytest.raises(TrialFailed, match="baseline failed during verification"):
        verify(BASE, [("fast", FAST, 1)], machine.run, rounds=4)


def test_round_planning() -> None:
    assert plan_rounds(1000, 10, 4) == 8                  # capped
    assert plan_rounds(200, 10, 4) == 5
    assert plan_rounds(10, 10, 4) == MIN_ROUNDS           # never fewer than the minimum
    assert plan_rounds(1000, 10, 4, max_rounds=MIN_ROUNDS) == MIN_ROUNDS  # --max-rounds: the time left is not used
    assert plan_rounds(200, 10, 4, max_rounds=6) == 5     # a cap above what fits changes nothing
    with pytest.raises(ValueError):
        verify(BASE, [], Machine({BASE: 1.0}).run, rounds=2)
