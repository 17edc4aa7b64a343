"""What a budget buys: how a run divides it between searching and proving, planned from the baseline's own
measurement, and refused when it buys no verdict.

Once the baseline is measured, its time accounting says what one search trial and one proof run cost on this
host with this model. From that the plan gives the number of trials the search can run, the candidates and
rounds the proof can afford, and the smallest speed-up such a proof could show at the noise the baseline's
samples had. A budget that leaves no time for a single candidate trial, or for the minimum proof, is refused
with a budget that would buy a useful run: before this plan such a run measured the baseline alone and reported
"baseline stands", which reads like a finding and is not one.

Pure: the tune paths hand in what they measured and print or raise what comes back.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tuner.durations import format_duration
from tuner.proof_defaults import MAX_ROUNDS, MIN_ROUNDS, RESERVE_MAX_FRACTION
from tuner.search import SPAWN_OVERHEAD_S
from tuner.stats import student_t_quantile
from tuner.verify import plan_rounds

TARGET_VERIFY_ROUNDS = 5
SUGGESTED_TRIALS = 10  # a refused budget is answered with one that buys about this many search trials
MEDIAN_EFFICIENCY = 1.2533  # sd of a sample median over sd of a sample mean, for normal samples (sqrt(pi/2))
BUDGET_STEP_S = 60.0  # suggested budgets are whole minutes
MAX_SUGGESTED_S = 7 * 24 * 3600.0  # beyond a week a suggestion is no help


def plan_verification(budget_seconds: float, run_cost: float, candidates: int, *,
                      max_fraction: float = RESERVE_MAX_FRACTION, max_rounds: int = MAX_ROUNDS) -> tuple[int, float]:
    """How many candidates to verify and how much time to hold back for it.

    Verification needs at least MIN_ROUNDS rounds of (candidates + baseline) runs. When that does not fit
    in ``max_fraction`` of the budget (RESERVE_MAX_FRACTION when a search shares it; all of it for a
    verification-only run), fewer candidates are verified (at least one); up to TARGET_VERIFY_ROUNDS
    rounds are reserved when the budget allows, and never more than ``max_rounds`` (--max-rounds): time the
    capped proof could not use goes to the search instead."""
    limit = max_fraction * budget_seconds
    fitting = int(limit // (MIN_ROUNDS * run_cost)) - 1 if run_cost > 0 else candidates
    k = max(1, min(candidates, fitting))
    target = max(MIN_ROUNDS, min(TARGET_VERIFY_ROUNDS, max_rounds))
    reserve = min(target * (k + 1) * run_cost, max(limit, MIN_ROUNDS * (k + 1) * run_cost))
    return k, reserve


def verification_run_cost(outcome: dict[str, Any], verify_samples: int) -> float:
    """Seconds one verification run will take, from a finished trial's time accounting. A run ends as the trial
    did, with what the trial spent on the metric its objective does not optimise (``info_seconds``: two runs of
    it in a benchmark trial, nothing in a live one, whose windows measure every metric at once); an outcome
    recorded without it is taken to have spent two samples' time."""
    n = max(1, len(outcome["values"]))
    per_sample = float(outcome["measure_seconds"]) / n
    info = float(outcome.get("info_seconds", 2 * per_sample))
    fixed = float(outcome["load_seconds"]) + float(outcome["warmup_seconds"])
    return SPAWN_OVERHEAD_S + fixed + verify_samples * per_sample + info


def detectable_effect(values: Sequence[float], samples_per_run: int, rounds: int, level: float) -> float | None:
    """The smallest speed-up a proof of ``rounds`` paired rounds could show significant, if every run is as noisy
    as ``values`` (one trial's samples) suggest: a run's value is the median of ``samples_per_run`` samples, a
    round's log ratio carries the noise of two runs, and :func:`tuner.stats.compare_paired` needs the mean log
    ratio's interval clear of zero. Machine phases between runs are not in one trial's samples, so this is a
    floor, not a promise. None without two positive samples."""
    logs = [math.log(v) for v in values if v > 0]
    if len(logs) < 2 or rounds < 2:
        return None
    sd_run = MEDIAN_EFFICIENCY * statistics.stdev(logs) / math.sqrt(max(1, samples_per_run))
    return smallest_provable_effect(math.sqrt(2.0) * sd_run, rounds, level)


def smallest_provable_effect(round_sd: float, rounds: int, level: float) -> float:
    """The speed-up whose mean log ratio just clears :func:`tuner.stats.compare_paired`'s interval when the
    per-round log ratios spread with standard deviation ``round_sd``."""
    t_crit = student_t_quantile(1.0 - level / 2.0, rounds - 1)
    return math.exp(t_crit * round_sd / math.sqrt(rounds)) - 1.0


@dataclass(frozen=True)
class BudgetPlan:
    """How the rest of a run's budget is spent, as planned right after the baseline was measured."""

    budget_s: float
    elapsed_s: float  # already spent (the baseline, or reading a resumed study)
    trial_s: float  # one search trial, from the baseline's measurement
    run_s: float  # one proof run
    requested: int  # the candidates asked for (--candidates)
    candidates: int  # the candidates the proof will measure (fewer when the budget is short)
    reserve_s: float  # held back for the proof
    known_candidates: int  # distinct finished trials the study already holds (a resumed study)
    searching: bool  # False for a proof-only run (``apply``)
    rounds: int
    max_rounds: int  # --max-rounds
    detectable: float | None  # see detectable_effect

    @property
    def left_s(self) -> float:
        return max(0.0, self.budget_s - self.elapsed_s)

    @property
    def search_s(self) -> float:
        return max(0.0, self.left_s - self.reserve_s) if self.searching else 0.0

    @property
    def trials(self) -> int:
        """Trials the search can start: it starts one while at least half a trial's time is left."""
        if self.search_s < 0.5 * self.trial_s:
            return 0
        return max(1, round(self.search_s / self.trial_s))

    def shortfall(self) -> str | None:
        """Why this budget buys no verdict, or None when it does."""
        if self.searching and self.trials == 0 and self.known_candidates == 0:
            return (f"leaves no time for a single candidate: after the baseline ({format_duration(self.elapsed_s)}) "
                    f"the proof needs {format_duration(self.reserve_s)} and one trial takes about "
                    f"{format_duration(self.trial_s)}")
        proof = MIN_ROUNDS * (self.candidates + 1) * self.run_s
        if self.left_s < proof:
            return (f"leaves {format_duration(self.left_s)} for a proof that needs at least {MIN_ROUNDS} rounds of "
                    f"{self.candidates + 1} runs of about {format_duration(self.run_s)} "
                    f"({format_duration(proof)})")
        return None

    def describe(self) -> str:
        parts = [f"budget plan: {format_duration(self.left_s)} left"]
        if self.searching:
            parts.append(f"about {self.trials} trial(s) of ~{format_duration(self.trial_s)}")
        parts.append(f"then {self.candidates} candidate(s) against the baseline in {self.rounds} rounds "
                     f"(~{format_duration(self.reserve_s)})")
        text = ", ".join(parts)
        if self.detectable is not None:
            text += (f"; such a proof can show about {100 * self.detectable:+.1f}% or more at the noise the "
                     "baseline's samples had")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trials": self.trials, "search_s": self.search_s, "text": self.describe()}


def plan_budget(*, budget_s: float, elapsed_s: float, trial_s: float, run_s: float, candidates: int,
                known_candidates: int, baseline_values: Sequence[float], samples_per_run: int, level: float,
                searching: bool = True, max_rounds: int = MAX_ROUNDS) -> BudgetPlan:
    """The plan for what is left of ``budget_s``; ``level`` is the proof's significance level before the
    correction for several candidates."""
    plan = _divide(budget_s, elapsed_s=elapsed_s, trial_s=max(trial_s, 1.0), run_s=max(run_s, 1.0),
                   candidates=candidates, known_candidates=known_candidates, searching=searching,
                   max_rounds=max_rounds)
    detectable = detectable_effect(baseline_values, samples_per_run, plan.rounds, level / plan.candidates)
    return dataclasses.replace(plan, detectable=detectable)


def suggested_budget(plan: BudgetPlan) -> float:
    """The smallest whole-minute budget that buys SUGGESTED_TRIALS trials (or, for a proof-only run, the proof),
    at the costs ``plan`` was made with."""
    budget = BUDGET_STEP_S * math.ceil(plan.budget_s / BUDGET_STEP_S)
    while budget < MAX_SUGGESTED_S:
        bigger = _divide(budget, elapsed_s=plan.elapsed_s, trial_s=plan.trial_s, run_s=plan.run_s,
                         candidates=plan.requested, known_candidates=plan.known_candidates,
                         searching=plan.searching, max_rounds=plan.max_rounds)
        if (not plan.searching or bigger.trials >= SUGGESTED_TRIALS) and bigger.shortfall() is None:
            return budget
        budget += BUDGET_STEP_S
    return budget


def _divide(budget_s: float, *, elapsed_s: float, trial_s: float, run_s: float, candidates: int,
            known_candidates: int, searching: bool, max_rounds: int) -> BudgetPlan:
    """The search/proof split of ``budget_s`` (a search may hold back RESERVE_MAX_FRACTION for the proof; a
    proof-only run all of it)."""
    fraction = RESERVE_MAX_FRACTION if searching else 1.0
    k, reserve = plan_verification(budget_s, run_s, candidates, max_fraction=fraction, max_rounds=max_rounds)
    return BudgetPlan(budget_s=budget_s, elapsed_s=elapsed_s, trial_s=trial_s, run_s=run_s, requested=candidates,
                      candidates=k, reserve_s=reserve, known_candidates=known_candidates, searching=searching,
                      rounds=plan_rounds(reserve, run_s, k + 1, max_rounds=max_rounds), max_rounds=max_rounds,
                      detectable=None)
