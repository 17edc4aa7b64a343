"""One run's steps, in one place: baseline, budget plan, search, stale check, proof.

A benchmark run (``llamahost tune``: a pinned llama-server worker per configuration) and a live run (the deployed
server under the live workload) differ in how one configuration is measured and in what changing the serving
configuration costs; the steps between them and their order are the same, and they are written here once, so the
two cannot drift (an earlier copy in the live run kept its own reserve fraction). ``fleet finish`` proves with
:func:`verify_candidates` alone, since the fleet's workers ran the search (:mod:`tuner.fleet.worker`).

The parts a run brings: the :class:`~tuner.search.Search` (its study, space and measurer), the
:class:`ProofSettings` its options ask for, what it calls the baseline, and its :class:`Pacing`: what a change of
configuration costs beyond the trial itself (nothing for a benchmark worker; the restart cap's wait for a live
server, :class:`tuner.live.drain.RestartGuard`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.budget import SUGGESTED_TRIALS, BudgetPlan, plan_budget, suggested_budget, verification_run_cost
from tuner.config import RunConfig
from tuner.durations import format_duration
from tuner.errors import UserError
from tuner.progress import TuneProgress
from tuner.proof_defaults import ALPHA, BENCHMARK_VERIFY_SAMPLES, MAX_LOAD_FACTOR, MAX_ROUNDS, MIN_EFFECT
from tuner.search import MeasurerLike, Search, fixed_samples
from tuner.stats import StopRule
from tuner.study import (
    baseline_trial,
    best_trials,
    both,
    enqueue_baseline,
    fail_stale_trials,
    is_baseline,
    load_seconds_of,
    load_within,
)
from tuner.verify import Arm, Verification, plan_rounds, verify

SEARCH_TRIAL_FRACTION = 0.5  # a trial is started while the search's time left exceeds this part of a trial's


class Pacing(Protocol):
    """What changing the serving configuration costs beyond the trial, and where the search must stop for it."""

    deadline: float | None  # monotonic: waits for a restart never run past it

    def restart_wait_s(self) -> float:
        """Seconds the next configuration change would wait (for the restart cap), 0 when it may go at once."""
        ...

    def hold_back_search(self) -> str:
        """Record that the search ended early for the wait; the reason, for the run's log."""
        ...


class FreeRestarts:
    """A benchmark's pacing: each trial starts its own worker, so a configuration change costs nothing extra."""

    deadline: float | None = None

    def restart_wait_s(self) -> float:
        return 0.0

    def hold_back_search(self) -> str:
        raise AssertionError("a benchmark's search is never held back: its restarts wait for nothing")


@dataclass(frozen=True)
class RunSteps:
    """What one run asks of the steps, beyond its proof settings."""

    baseline_name: str  # what the baseline is, for the messages ("llama.cpp's defaults", "the deployed ...")
    baseline_fix: str  # what to do when the baseline cannot be measured
    candidates: int  # configurations the proof takes on against the baseline
    trials: int | None = None  # --trials: the search ends after this many (None: the budget ends it)
    searching: bool = True  # False: prove the study's candidates without a search (``apply --verify-only``)
    eligible: Callable[[FrozenTrial], bool] | None = None  # which trials may become candidates (a TTFT limit)


@dataclass
class Proven:
    """What the steps leave for the run to write: the budget plan and the proof."""

    plan: BudgetPlan
    verification: Verification


def search_and_prove(search: Search, proof: ProofSettings, steps: RunSteps, *, started: float, budget_s: float,
                     pacing: Pacing | None = None,
                     on_baseline: Callable[[FrozenTrial], None] | None = None) -> Proven:
    """Baseline (measured, or kept from a resumed study), the budget's plan, the search within its part of the
    budget, the stale check, then the proof of the best candidates against the baseline in what is left.
    ``on_baseline`` sees the baseline before the search starts (a live measurer bounds latency by it)."""
    pacing = pacing or FreeRestarts()
    study, progress = search.study, search.progress
    deadline = started + budget_s
    base = measure_baseline(search, deadline, baseline_name=steps.baseline_name, fix=steps.baseline_fix)
    if on_baseline is not None:
        on_baseline(base)
    plan = plan_after_baseline(study, base, budget_s=budget_s, started=started, candidates=steps.candidates,
                               proof=proof, searching=steps.searching, eligible=steps.eligible)
    progress.event(plan.describe())
    if steps.searching:
        search_end, trial_s = deadline - plan.reserve_s, SEARCH_TRIAL_FRACTION * plan.trial_s
        pacing.deadline = search_end  # a trial's wait for a restart never eats the proof's time
        search.run_until(lambda: search_end, lambda: trial_s + pacing.restart_wait_s(), max_trials=steps.trials)
        pacing.deadline = deadline
        if search_end - time.monotonic() > trial_s and pacing.restart_wait_s() > 0:
            progress.event(f"the search ends: {pacing.hold_back_search()}")
    progress.update("verifying")
    fail_stale_trials(study)
    verification = verify_candidates(study, search.space.baseline(), search.measurer, progress, deadline,
                                     plan.run_s, plan.candidates, proof, eligible=steps.eligible)
    return Proven(plan, verification)


def measure_baseline(search: Search, deadline: float, *, baseline_name: str, fix: str) -> FrozenTrial:
    """The first trial of a study is the baseline; a resumed study reuses its measurement. A baseline that
    fails twice, or fails with no budget left for another try, ends the run: with the baseline failing,
    nothing can be proven against it."""
    study, space = search.study, search.space
    failures = 0
    while (base := baseline_trial(study)) is None:
        if not any(is_baseline(t) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
            enqueue_baseline(study, space.baseline_params(), space.baseline())
        attempt_started = time.monotonic()
        trial = search.run_one()
        if trial is not None and is_baseline(trial) and trial.state == TrialState.FAIL:
            failures += 1
            attempt = time.monotonic() - attempt_started
            if failures >= 2 or time.monotonic() + attempt > deadline:
                raise UserError(f"the baseline configuration ({baseline_name}) could not be measured: "
                                f"{trial.user_attrs.get('failure', '?')}", fix)
    return base


def plan_after_baseline(study: optuna.Study, base: FrozenTrial, *, budget_s: float, started: float,
                        candidates: int, proof: ProofSettings, searching: bool = True,
                        eligible: Callable[[FrozenTrial], bool] | None = None) -> BudgetPlan:
    """What the rest of the budget buys (:mod:`tuner.budget`), from the baseline's measurement; a budget that
    buys no verdict is refused here, with the study keeping the baseline for the next run."""
    outcome = base.user_attrs["outcome"]
    plan = plan_budget(budget_s=budget_s, elapsed_s=time.monotonic() - started,
                       trial_s=float(outcome["wall_seconds"]), run_s=verification_run_cost(outcome, proof.samples),
                       candidates=candidates, known_candidates=len(best_trials(study, 1, eligible=eligible)),
                       baseline_values=outcome["values"], samples_per_run=proof.samples, level=proof.alpha,
                       searching=searching, max_rounds=proof.max_rounds)
    shortfall = plan.shortfall()
    if shortfall is not None:
        raise UserError(f"a budget of {format_duration(budget_s)} {shortfall}",
                        f"pass --budget {format_duration(suggested_budget(plan))} or more (it buys about "
                        f"{SUGGESTED_TRIALS} trials and the proof); the study keeps what was measured and the next "
                        "run resumes it")
    return plan


class ProofOptions(Protocol):
    """What a request says about its proof: a benchmark's TuneRequest and a live LiveRequest both do."""

    @property
    def alpha(self) -> float: ...
    @property
    def min_effect(self) -> float: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def max_load_factor(self) -> float: ...
    @property
    def max_rounds(self) -> int: ...


@dataclass(frozen=True)
class ProofSettings:
    """How the final verification measures and decides (see :mod:`tuner.verify`)."""

    stop: StopRule
    samples: int = BENCHMARK_VERIFY_SAMPLES
    alpha: float = ALPHA
    min_effect: float = MIN_EFFECT
    seed: int = 0
    max_load_factor: float = MAX_LOAD_FACTOR  # 0: no bound on a candidate's load time
    max_rounds: int = MAX_ROUNDS  # the proof takes what the budget leaves, up to this many rounds

    @classmethod
    def of(cls, request: ProofOptions, stop: StopRule, samples: int) -> ProofSettings:
        """The proof ``request`` asks for, each run measuring ``samples`` samples (a benchmark's requests, a
        live run's windows): the one place either kind of run turns its options into proof settings."""
        return cls(stop=stop, samples=samples, alpha=request.alpha, min_effect=request.min_effect,
                   seed=request.seed or 0, max_load_factor=request.max_load_factor, max_rounds=request.max_rounds)


def verify_candidates(study: optuna.Study, baseline: RunConfig, measurer: MeasurerLike, progress: TuneProgress,
                      deadline: float, run_cost: float, k: int, proof: ProofSettings,
                      eligible: Callable[[FrozenTrial], bool] | None = None) -> Verification:
    """The study's ``k`` best distinct (and ``eligible``) configurations against the baseline, interleaved,
    until ``deadline``. Candidates are rebuilt from the configuration each trial recorded. A trial whose server
    took longer to come up than the load bound allows (:func:`tuner.study.load_limit`) is left out, and said so:
    a faster token rate never hides a start several times slower."""
    top = best_trials(study, k, eligible=both(eligible, load_within(study, proof.max_load_factor)))
    kept = {t.number for t in top}
    slow = [t for t in best_trials(study, k, eligible=eligible) if t.number not in kept]
    base = baseline_trial(study) if slow else None
    for trial in slow:
        progress.event(f"trial {trial.number} is left out of the proof: its server took "
                       f"{load_seconds_of(trial) or 0:.1f} s to come up against the baseline's "
                       f"{load_seconds_of(base) if base else 0:.1f} s (more than x{proof.max_load_factor:g}; "
                       "--max-load-factor 0 lifts the bound)")
    candidates = [(f"trial-{t.number}", RunConfig.from_dict(
        t.user_attrs["config"], origin=f"trial {t.number} of study {study.study_name}"), t.number) for t in top]
    if not candidates:
        base = baseline_trial(study)
        assert base is not None
        arm = Arm.from_search("baseline", baseline, base.number, base.user_attrs["outcome"])
        return Verification(baseline=arm, candidates=[], rounds=0, alpha=proof.alpha, min_effect=proof.min_effect)
    rounds = plan_rounds(deadline - time.monotonic(), run_cost, len(candidates) + 1, max_rounds=proof.max_rounds)
    progress.event(f"verifying {len(candidates)} candidate(s) against the baseline in {rounds} interleaved rounds")
    stop = fixed_samples(proof.stop, proof.samples)

    def run_once(config: RunConfig, label: str) -> Any:
        return measurer.run(config, label, stop=stop)

    def on_round(done: int, total: int) -> None:
        progress.update(f"verification round {done}/{total}")

    return verify(baseline, candidates, run_once, rounds=rounds, alpha=proof.alpha, min_effect=proof.min_effect,
                  seed=proof.seed, on_round=on_round)
