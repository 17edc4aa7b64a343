"""How a run divides its budget between searching and proving."""

from __future__ import annotations

import pytest

from tuner.budget import plan_verification
from tuner.errors import UserError
from tuner.proof_defaults import MIN_ROUNDS, RESERVE_MAX_FRACTION
from tuner.tune import TuneRequest, measure_cap, validate_request


def test_long_budgets_verify_every_candidate_with_room_for_more_rounds() -> None:
    k, reserve = plan_verification(8 * 3600, run_cost=30, candidates=3)
    assert k == 3
    assert reserve == 5 * 4 * 30


def test_short_budgets_verify_fewer_candidates_to_stay_within_the_budget() -> None:
    budget = 600
    k, reserve = plan_verification(budget, run_cost=30, candidates=3)
    assert k == 1
    assert MIN_ROUNDS * (k + 1) * 30 <= reserve <= RESERVE_MAX_FRACTION * budget


def test_at_least_one_candidate_and_the_minimum_rounds_even_when_that_overruns() -> None:
    k, reserve = plan_verification(120, run_cost=60, candidates=3)
    assert k == 1
    assert reserve == MIN_ROUNDS * 2 * 60


def test_a_capped_proof_holds_back_only_the_rounds_it_may_run_and_the_search_gets_the_rest() -> None:
    """--max-rounds 3 against a long budget: the reserve is three rounds, not TARGET_VERIFY_ROUNDS, so a capped
    run searches for the time an uncapped proof would have taken instead of ending early."""
    from tuner.budget import plan_budget

    k, uncapped = plan_verification(8 * 3600, run_cost=30, candidates=3)
    assert plan_verification(8 * 3600, run_cost=30, candidates=3, max_rounds=3) == (k, MIN_ROUNDS * (k + 1) * 30)
    assert uncapped > MIN_ROUNDS * (k + 1) * 30
    common = dict(budget_s=3600.0, elapsed_s=60.0, trial_s=60.0, run_s=30.0, candidates=3, known_candidates=0,
                  baseline_values=[10.0, 10.2, 9.9], samples_per_run=5, level=0.05)
    free, capped = plan_budget(**common), plan_budget(**common, max_rounds=3)  # type: ignore[arg-type]
    assert capped.rounds == 3 < free.rounds
    assert capped.search_s - free.search_s == free.reserve_s - capped.reserve_s > 0
    assert capped.trials > free.trials


def test_trial_sampling_cap_scales_with_the_budget() -> None:
    assert measure_cap(TuneRequest(budget_seconds=60)) == 5.0
    assert measure_cap(TuneRequest(budget_seconds=600)) == 20.0
    assert measure_cap(TuneRequest(budget_seconds=8 * 3600)) == 60.0
    assert measure_cap(TuneRequest(budget_seconds=600, max_measure_seconds=7)) == 7


@pytest.mark.parametrize(("request_", "fragment"), [
    (TuneRequest(budget_seconds=0), "must be positive"),
    (TuneRequest(budget_seconds=10), "cannot measure a baseline"),
    (TuneRequest(budget_seconds=600, objective="fast"), "unknown objective"),
    (TuneRequest(budget_seconds=600, candidates=0), "--candidates"),
])
def test_request_validation(request_: TuneRequest, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        validate_request(request_)


def test_every_path_takes_the_proofs_defaults_from_one_place() -> None:
    """A benchmark tune, a live tune, ``apply`` and ``fleet finish`` prove a winner with the same defaults: the
    command lines and the request types all read tuner.proof_defaults (the live run once hard-coded its own)."""
    from tuner import proof_defaults as proof
    from tuner.cli import build_parser
    from tuner.live.session import LiveRequest
    from tuner.pipeline import ProofSettings
    from tuner.verify import verify

    parser = build_parser()
    for argv in (["tune"], ["apply"], ["fleet", "finish"]):
        args = parser.parse_args(argv)
        assert (args.candidates, args.alpha, args.min_effect) == (proof.CANDIDATES, proof.ALPHA, proof.MIN_EFFECT)
        assert args.max_rounds == proof.MAX_ROUNDS
    assert parser.parse_args(["tune"]).verify_windows == proof.LIVE_VERIFY_WINDOWS
    benchmark, live = TuneRequest(budget_seconds=600), LiveRequest(budget_seconds=600)
    assert (benchmark.candidates, benchmark.alpha, benchmark.min_effect, benchmark.verify_samples) == (
        proof.CANDIDATES, proof.ALPHA, proof.MIN_EFFECT, proof.BENCHMARK_VERIFY_SAMPLES)
    assert (live.candidates, live.alpha, live.min_effect, live.verify_windows) == (
        proof.CANDIDATES, proof.ALPHA, proof.MIN_EFFECT, proof.LIVE_VERIFY_WINDOWS)
    assert verify.__kwdefaults__ is not None
    assert (verify.__kwdefaults__["alpha"], verify.__kwdefaults__["min_effect"]) == (proof.ALPHA, proof.MIN_EFFECT)
    assert ProofSettings.__dataclass_fields__["samples"].default == proof.BENCHMARK_VERIFY_SAMPLES
    assert benchmark.max_rounds == live.max_rounds == ProofSettings.__dataclass_fields__["max_rounds"].default \
        == proof.MAX_ROUNDS


def test_both_kinds_of_run_turn_their_options_into_the_same_proof_settings() -> None:
    from tuner.live.session import LiveRequest
    from tuner.pipeline import ProofSettings
    from tuner.stats import StopRule

    options = dict(alpha=0.01, min_effect=0.03, seed=7, max_load_factor=2.5, max_rounds=4)
    benchmark = ProofSettings.of(TuneRequest(budget_seconds=600, **options), StopRule(), samples=9)  # type: ignore[arg-type]
    live = ProofSettings.of(LiveRequest(budget_seconds=600, **options), StopRule(), samples=9)  # type: ignore[arg-type]
    assert benchmark == live == ProofSettings(stop=StopRule(), samples=9, **options)  # type: ignore[arg-type]
    assert ProofSettings.of(TuneRequest(budget_seconds=600), StopRule(), samples=5).seed == 0  # no seed: 0


def test_max_rounds_reaches_both_requests_and_fewer_than_a_verdict_needs_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.cli import build_parser
    from tuner.commands.tune import request_from_args
    from tuner.live.setup import live_request

    parser = build_parser()
    args = parser.parse_args(["tune", "--budget", "10m", "--max-rounds", "4"])
    assert request_from_args(args).max_rounds == 4
    assert live_request(parser.parse_args(["tune", "--live", "--budget", "10m", "--max-rounds", "4"]),
                        verify_only=False).max_rounds == 4
    for bad in ("2", "three"):
        with pytest.raises(SystemExit) as refused:
            parser.parse_args(["tune", "--max-rounds", bad])
        assert refused.value.code == 2
        assert f"--max-rounds: {bad!r} is not a number of rounds of {MIN_ROUNDS} or more" in capsys.readouterr().err
