"""What a budget buys (tuner.budget): the plan made after the baseline, the refusal of a budget that buys no
verdict, and the suggested budget that would."""

from __future__ import annotations

import math

import pytest

from tuner.budget import (
    SUGGESTED_TRIALS,
    BudgetPlan,
    detectable_effect,
    plan_budget,
    smallest_provable_effect,
    suggested_budget,
    verification_run_cost,
)
from tuner.proof_defaults import MIN_ROUNDS
from tuner.search import SPAWN_OVERHEAD_S
from tuner.stats import compare_paired

NOISY = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0]


def a_plan(budget_s: float, *, elapsed_s: float = 10.0, trial_s: float = 8.0, run_s: float = 10.0,
           candidates: int = 3, known_candidates: int = 0, searching: bool = True) -> BudgetPlan:
    return plan_budget(budget_s=budget_s, elapsed_s=elapsed_s, trial_s=trial_s, run_s=run_s, candidates=candidates,
                       known_candidates=known_candidates, baseline_values=NOISY, samples_per_run=5, level=0.05,
                       searching=searching)


def test_a_long_budget_searches_what_the_proof_does_not_hold_back() -> None:
    plan = a_plan(3600)
    assert plan.shortfall() is None
    assert plan.candidates == 3 and plan.rounds == 5
    assert plan.trials == round((3600 - 10 - plan.reserve_s) / 8)
    assert "about" in plan.describe() and f"{plan.trials} trial(s)" in plan.describe()


def test_a_budget_with_no_time_for_a_candidate_is_refused_and_the_suggestion_buys_a_search() -> None:
    plan = a_plan(60, elapsed_s=30, trial_s=20, run_s=10)
    assert plan.trials == 0
    reason = plan.shortfall()
    assert reason is not None and "no time for a single candidate" in reason
    budget = suggested_budget(plan)
    assert budget % 60 == 0
    bigger = a_plan(budget, elapsed_s=30, trial_s=20, run_s=10)
    assert bigger.shortfall() is None and bigger.trials >= SUGGESTED_TRIALS
    smaller = a_plan(budget - 60, elapsed_s=30, trial_s=20, run_s=10)
    assert smaller.trials < SUGGESTED_TRIALS, "the suggestion is the smallest whole-minute budget that does"


def test_a_resumed_study_with_candidates_needs_only_the_time_to_prove_them() -> None:
    plan = a_plan(70, elapsed_s=1, trial_s=60, run_s=10, known_candidates=2)
    assert plan.trials == 0 and plan.shortfall() is None  # 3 rounds of 2 runs fit in 69 s


def test_a_proof_that_cannot_reach_the_minimum_rounds_is_refused() -> None:
    plan = a_plan(50, elapsed_s=1, run_s=10, known_candidates=2, searching=False)
    reason = plan.shortfall()
    assert reason is not None and f"at least {MIN_ROUNDS} rounds" in reason
    assert a_plan(suggested_budget(plan), elapsed_s=1, run_s=10, known_candidates=2,
                  searching=False).shortfall() is None


@pytest.mark.parametrize("rounds", [3, 5, 8])
def test_the_smallest_provable_effect_is_where_the_paired_test_turns_significant(rounds: int) -> None:
    """Rounds whose log ratios alternate around a mean spread with a known sd: just above the floor the paired
    test proves the candidate, just below it does not."""
    offsets = [(-1) ** i for i in range(rounds)]
    centred = [o - sum(offsets) / rounds for o in offsets]
    sd = math.sqrt(sum(c * c for c in centred) / (rounds - 1))
    spread = [0.02 * c / sd for c in centred]  # sd of the log ratios: 0.02
    floor = math.log1p(smallest_provable_effect(0.02, rounds, 0.05))
    for factor, proven in ((1.02, True), (0.98, False)):
        ratios = [math.exp(factor * floor + s) for s in spread]
        result = compare_paired(ratios, [1.0] * rounds, alpha=0.05, min_effect=0.0)
        assert result.significant is proven, (factor, result)


def test_noisier_samples_and_fewer_rounds_need_a_bigger_effect() -> None:
    calm = detectable_effect([100.0, 100.5, 99.5, 100.2], samples_per_run=5, rounds=5, level=0.05)
    noisy = detectable_effect(NOISY, samples_per_run=5, rounds=5, level=0.05)
    short = detectable_effect(NOISY, samples_per_run=5, rounds=3, level=0.05)
    assert calm is not None and noisy is not None and short is not None
    assert 0 < calm < noisy < short
    assert detectable_effect([100.0], samples_per_run=5, rounds=5, level=0.05) is None


def test_a_proof_run_costs_what_its_trial_spent_on_the_other_metric_and_a_live_one_nothing() -> None:
    """A live window measures every metric at once (info_seconds 0); a benchmark trial spent two runs of the
    metric it does not optimise. Before, every run was charged two samples more, which on an emulated lab host
    made the proof of a live run look 40% dearer and refused its budget."""
    trial = {"values": [10.0, 11.0, 10.5], "measure_seconds": 30.0, "load_seconds": 4.0, "warmup_seconds": 6.0}
    live = verification_run_cost({**trial, "info_seconds": 0.0}, verify_samples=3)
    benchmark = verification_run_cost({**trial, "info_seconds": 7.5}, verify_samples=3)
    assert live == pytest.approx(SPAWN_OVERHEAD_S + 4 + 6 + 3 * 10)
    assert benchmark == pytest.approx(live + 7.5)
    assert verification_run_cost(trial, verify_samples=3) == pytest.approx(live + 2 * 10), "older outcomes"
