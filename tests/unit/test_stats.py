"""The statistics every verdict rests on: exact median intervals, warm-up, stopping, paired comparison."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from tuner.stats import (
    StopRule,
    compare_paired,
    geometric_mean,
    median_ci_ranks,
    sampling_should_stop,
    summarize,
    warmup_is_stable,
)


@pytest.mark.parametrize(("n", "lo", "hi", "coverage"), [
    (5, 0, 4, 1 - 2 / 32),        # the full range of 5 samples covers the median with 93.75%
    (6, 0, 5, 1 - 2 / 64),
    (10, 1, 8, 0.978515625),       # x(2)..x(9) of 10: P(2 <= B <= 8)
    (20, 5, 14, 0.9586105346679688),
])
def test_median_interval_ranks_and_coverage_are_exact(n: int, lo: int, hi: int, coverage: float) -> None:
    expected: tuple[int, int, object] = (lo, hi, pytest.approx(coverage))
    assert median_ci_ranks(n, 0.95) == expected


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_median_interval_ranks_agree_with_scipys_binomial_for_every_sample_count(confidence: float) -> None:
    for n in range(1, 201):
        binom = scipy_stats.binom(n, 0.5)
        k = next((k for k in range((n - 1) // 2, 0, -1) if binom.cdf(n - 1 - k) - binom.cdf(k) >= confidence), 0)
        lo, hi, coverage = median_ci_ranks(n, confidence)
        assert (lo, hi) == (k, n - 1 - k), n
        assert coverage == pytest.approx(binom.cdf(n - 1 - k) - binom.cdf(k), abs=1e-12), n


def test_sampling_decisions_do_not_import_scipy() -> None:
    """A trial's first sample asks for a median interval and a stop decision; scipy.stats, imported there, cost
    that one sample half a minute on an emulated host, and the budget planner took it for every sample's cost."""
    probe = ("import sys\n"
             "from tuner.stats import StopRule, sampling_should_stop, summarize\n"
             "summarize([1.0]); summarize([3.0, 1.0, 2.0, 2.5, 2.2])\n"
             "sampling_should_stop([1.0, 1.1, 1.05], StopRule(min_samples=3, max_samples=12, target_rel_ci=0.03))\n"
             "print(sorted(name for name in sys.modules if name.split('.')[0] == 'scipy'))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


def test_median_interval_covers_the_true_median_at_least_as_often_as_promised() -> None:
    rng = random.Random(7)
    n, trials, hits = 12, 2000, 0
    true_median = scipy_stats.lognorm(0.3).median()
    for _ in range(trials):
        sample = [rng.lognormvariate(0, 0.3) for _ in range(n)]
        summary = summarize(sample)
        hits += summary.ci_low <= true_median <= summary.ci_high
    assert hits / trials >= summary.confidence - 0.02


def test_summary_of_skewed_samples_uses_median_and_mad() -> None:
    summary = summarize([100, 101, 99, 100, 40])  # one run hit by a context switch
    assert summary.median == 100
    assert summary.mad == 1
    assert summary.mean < 90
    assert summary.to_dict()["n"] == 5


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_summary_refuses_empty_or_non_finite_samples(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_warmup_is_stable_only_when_the_tail_agrees_and_stopped_climbing() -> None:
    assert not warmup_is_stable([50, 80])                       # too few
    assert not warmup_is_stable([50, 80, 100, 101, 140])        # still moving
    assert not warmup_is_stable([90, 93, 96.5], tolerance=0.1)  # within 10% but climbing every run
    assert warmup_is_stable([50, 80, 100, 101, 99.5])


def test_sampling_stops_when_the_interval_is_narrow_or_at_the_cap() -> None:
    rule = StopRule(min_samples=5, max_samples=8, target_rel_ci=0.02)
    assert sampling_should_stop([100, 100.5, 99.8], rule) is None            # below min_samples
    assert sampling_should_stop([100, 100.5, 99.8, 100.2, 100.1, 99.9], rule) == "ci-narrow"
    noisy = [100, 120, 80, 110, 90, 130, 70]
    assert sampling_should_stop(noisy, rule) is None
    assert sampling_should_stop([*noisy, 100], rule) == "max-samples"


def test_stop_rule_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        StopRule(min_samples=2)
    with pytest.raises(ValueError):
        StopRule(min_samples=5, max_samples=4)
    with pytest.raises(ValueError):
        StopRule(target_rel_ci=0)


def test_clear_improvement_is_significant() -> None:
    rng = random.Random(1)
    base = [100 * rng.uniform(0.97, 1.03) for _ in range(6)]
    cand = [b * 1.10 * rng.uniform(0.99, 1.01) for b in base]
    result = compare_paired(cand, base, comparisons=3)
    assert result.significant
    assert result.ci_low > 1.0
    assert result.ratio == pytest.approx(1.10, rel=0.02)


def test_pairing_cancels_a_slow_phase_that_hits_both_arms_of_a_round() -> None:
    phase = [1.0, 0.6, 1.0, 0.7, 1.0, 0.65]  # half the rounds ran while something else hogged the CPU
    base = [100 * p for p in phase]
    cand = [105 * p * f for p, f in zip(phase, [1.0, 1.005, 0.995, 1.0, 1.004, 0.996], strict=True)]
    assert compare_paired(cand, base).significant


def test_tiny_gains_are_not_worth_a_change_even_when_certain() -> None:
    base = [100.0, 100.1, 99.9, 100.0, 100.05]
    cand = [b * 1.004 for b in base]
    result = compare_paired(cand, base, min_effect=0.01)
    assert result.ci_low > 1.0
    assert not result.significant


def test_a_a_comparisons_rarely_produce_a_winner() -> None:
    """Identical configurations must not produce a winner more often than alpha allows."""
    rng = random.Random(42)
    winners = 0
    runs = 400
    for _ in range(runs):
        base = [rng.gauss(100, 4) for _ in range(5)]
        same = [rng.gauss(100, 4) for _ in range(5)]
        winners += compare_paired(same, base, alpha=0.05, comparisons=3, min_effect=0.0).significant
    assert winners / runs <= 0.05 / 3 + 0.02


def test_bonferroni_makes_more_candidates_need_stronger_evidence() -> None:
    base = [100, 102, 98, 101, 99]
    cand = [104, 105, 101, 104, 103]
    one = compare_paired(cand, base, comparisons=1)
    many = compare_paired(cand, base, comparisons=10)
    assert many.ci_low < one.ci_low
    assert one.p_value == many.p_value


def test_compare_paired_validates_its_input() -> None:
    with pytest.raises(ValueError):
        compare_paired([1, 2], [1])
    with pytest.raises(ValueError):
        compare_paired([1], [1])
    with pytest.raises(ValueError):
        compare_paired([1, -1], [1, 1])


def test_geometric_mean() -> None:
    assert geometric_mean([4, 9]) == pytest.approx(6)
    with pytest.raises(ValueError):
        geometric_mean([0, 1])
