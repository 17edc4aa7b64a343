"""Prove the winner: re-measure the best candidates and the baseline, interleaved, and test the difference.

The search's numbers are biased upwards for whoever ends up on top (the winner's curse: among many noisy
measurements the best one is partly luck), and they were taken at different times of a noisy night. So
the best few distinct candidates and the baseline are measured again in rounds; within a round every
configuration runs once, in a shuffled order, each in a fresh worker. Paired per-round ratios cancel slow
phases of the machine that hit a whole round. A candidate wins only if it is significantly faster after a
Bonferroni correction for the number of candidates, and by at least the minimum effect; otherwise the
baseline stands and nothing is written.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.config import RunConfig
from tuner.errors import TrialFailed
from tuner.proof_defaults import ALPHA, MAX_ROUNDS, MIN_EFFECT, MIN_ROUNDS
from tuner.stats import Comparison, Summary, compare_paired, summarize
from tuner.trial.runner import TrialOutcome


@dataclass
class Arm:
    """One configuration under verification and what each round measured."""

    label: str
    config: RunConfig
    trial_number: int | None = None
    round_values: list[float] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # every run's samples, by metric
    failure: str | None = None
    comparison: Comparison | None = None
    load_seconds: list[float] = field(default_factory=list)  # each run's start to healthy

    @property
    def load_median_s(self) -> float | None:
        """The median time this configuration's server took to come up healthy (None: not recorded)."""
        return statistics.median(self.load_seconds) if self.load_seconds else None

    @classmethod
    def from_search(cls, label: str, config: RunConfig, trial_number: int, outcome: dict[str, Any]) -> Arm:
        """An arm carrying a search trial's own measurement (when there was nothing to verify against)."""
        arm = cls(label, config, trial_number)
        arm.round_values = [summarize(outcome["values"]).median]
        for name in sorted(set(outcome["series"]) | set(outcome["info"])):
            arm.samples[name] = list(outcome["series"].get(name) or outcome["info"].get(name) or [])
        if outcome.get("load_seconds"):
            arm.load_seconds = [float(outcome["load_seconds"])]
        return arm

    def add(self, outcome: TrialOutcome) -> None:
        self.round_values.append(outcome.value)
        if outcome.load_seconds > 0:
            self.load_seconds.append(outcome.load_seconds)
        for name in outcome.metric_names:
            self.samples.setdefault(name, []).extend(outcome.metric(name))

    def metric(self, name: str) -> Summary | None:
        samples = self.samples.get(name)
        return summarize(samples) if samples else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "trial": self.trial_number,
            "config": self.config.to_dict(),
            "round_values": self.round_values,
            "failure": self.failure,
            "comparison": self.comparison.to_dict() if self.comparison else None,
            "load_seconds": self.load_median_s,
        }
        for name in sorted(self.samples):
            summary = self.metric(name)
            out[name] = summary.to_dict() if summary else None
        return out


@dataclass
class Verification:
    baseline: Arm
    candidates: list[Arm]
    rounds: int
    alpha: float
    min_effect: float

    @property
    def comparisons(self) -> int:
        """How many candidates share the baseline, so the Bonferroni divisor of every comparison's level."""
        return max(1, len(self.candidates))

    @property
    def level(self) -> float:
        """The level each candidate's test ran at (and ``1 - level`` its interval's confidence)."""
        return self.alpha / self.comparisons

    @property
    def winner(self) -> Arm | None:
        """The significantly better candidate with the largest speed-up, if any."""
        proven = [a for a in self.candidates if a.comparison is not None and a.comparison.significant]
        return max(proven, key=lambda a: a.comparison.ratio if a.comparison else 0.0, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "alpha": self.alpha,
            "comparisons": self.comparisons,
            "level": self.level,
            "min_effect": self.min_effect,
            "baseline": self.baseline.to_dict(),
            "candidates": [a.to_dict() for a in self.candidates],
            "winner": self.winner.label if self.winner else None,
        }


# Measures one configuration once (a fresh worker); raises TrialFailed when the run fails.
RunOnce = Callable[[RunConfig, str], TrialOutcome]
RoundCallback = Callable[[int, int], None]


def verify(
    baseline: RunConfig,
    candidates: Sequence[tuple[str, RunConfig, int | None]],
    run_once: RunOnce,
    *,
    rounds: int,
    alpha: float = ALPHA,
    min_effect: float = MIN_EFFECT,
    seed: int = 0,
    on_round: RoundCallback | None = None,
) -> Verification:
    """Measure ``baseline`` and ``candidates`` in ``rounds`` interleaved rounds and compare each candidate
    with the baseline. A candidate that fails in any round is out (a configuration that sometimes fails
    is not one to deploy); a failing baseline is an error the caller must see."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"need at least {MIN_ROUNDS} rounds")
    base = Arm("baseline", baseline)
    arms = [Arm(label, config, number) for label, config, number in candidates]
    rng = random.Random(seed)
    for r in range(rounds):
        live = [a for a in arms if a.failure is None]
        order = [base, *live]
        rng.shuffle(order)
        for arm in order:
            try:
                arm.add(run_once(arm.config, f"verify-r{r}-{arm.label}"))
            except TrialFailed as failed:
                if arm is base:
                    raise TrialFailed(f"the baseline failed during verification: {failed.reason}") from None
                arm.failure = failed.reason
        if on_round is not None:
            on_round(r + 1, rounds)
    verification = Verification(baseline=base, candidates=arms, rounds=rounds, alpha=alpha, min_effect=min_effect)
    for arm in (a for a in arms if a.failure is None):
        arm.comparison = compare_paired(arm.round_values, base.round_values, alpha=alpha,
                                        comparisons=verification.comparisons, min_effect=min_effect)
    return verification


def plan_rounds(seconds_available: float, seconds_per_run: float, arms: int, *, max_rounds: int = MAX_ROUNDS) -> int:
    """As many rounds as fit (at least the minimum: a verdict from fewer is not worth writing)."""
    if seconds_per_run <= 0 or arms <= 0:
        return MIN_ROUNDS
    fit = int(seconds_available // (seconds_per_run * arms))
    return max(MIN_ROUNDS, min(max_rounds, fit))
