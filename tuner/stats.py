"""The statistics behind every number llamahost reports. Pure functions, no I/O.

Throughput samples on a shared machine are skewed (a context switch only ever makes a run slower) and
sometimes bimodal, so the centre is the median, the spread the MAD, and the confidence interval of the
median comes from order statistics: distribution-free and exact for any sample size.

Three decisions are made here:

* :func:`warmup_is_stable` - when warm-up may end (the pyperf idea: a capped stability test, not a
  fixed count);
* :func:`sampling_should_stop` - when a trial has measured enough (the median's interval is narrow, or a
  cap is hit);
* :func:`compare_paired` - whether a candidate really beats the baseline, from interleaved rounds,
  with a Bonferroni correction for the number of candidates tried at once.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.proof_defaults import ALPHA, MIN_EFFECT


def _scipy_stats() -> Any:
    """scipy.stats, imported when a number is first needed: it takes about a second to import, and every
    ``llamahost`` command, ``--help`` included, would pay for it."""
    from scipy import stats

    return stats


MIN_SAMPLES = 3  # fewer samples give no usable interval of the median


@dataclass(frozen=True)
class Summary:
    """A sample set reduced to what a reader needs; ``ci_*`` bound the median."""

    n: int
    median: float
    mad: float
    mean: float
    minimum: float
    maximum: float
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def rel_ci_halfwidth(self) -> float:
        if self.median <= 0:
            return math.inf
        return (self.ci_high - self.ci_low) / 2.0 / self.median

    @property
    def rel_mad(self) -> float:
        return self.mad / self.median if self.median > 0 else math.inf

    def to_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "median": self.median,
            "mad": self.mad,
            "mean": self.mean,
            "min": self.minimum,
            "max": self.maximum,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
        }


def _check_samples(samples: Sequence[float]) -> list[float]:
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("no samples")
    if any(not math.isfinite(v) for v in values):
        raise ValueError("samples must be finite")
    return values


def _half_binomial_cdf(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2), exactly: the count of outcomes over 2**n. Not scipy: every trial's
    first sample asks for a median's interval, and importing scipy.stats there cost that sample about a second
    on a real host and half a minute on an emulated one, which then passed for the cost of every sample."""
    return sum(math.comb(n, i) for i in range(max(0, min(k, n) + 1))) / (1 << n)


def median_ci_ranks(n: int, confidence: float) -> tuple[int, int, float]:
    """0-based ranks (lo, hi) of the order statistics that bound the median, and their exact coverage.

    With B the number of samples below the true median (B ~ Binomial(n, 1/2)), the interval
    [x_(k), x_(n-1-k)] covers the median exactly when k+1 <= B <= n-1-k. The narrowest interval whose
    coverage is still >= ``confidence`` is returned; with too few samples for that, the full range with
    its (lower) actual coverage.
    """
    if n < 1:
        raise ValueError("n must be >= 1")

    def coverage(k: int) -> float:
        return _half_binomial_cdf(n - 1 - k, n) - _half_binomial_cdf(k, n)

    best = 0
    for k in range(1, (n - 1) // 2 + 1):
        if coverage(k) < confidence:
            break
        best = k
    return best, n - 1 - best, coverage(best)


def summarize(samples: Sequence[float], confidence: float = 0.95) -> Summary:
    values = _check_samples(samples)
    ordered = sorted(values)
    med = statistics.median(ordered)
    mad = statistics.median(abs(v - med) for v in ordered)
    lo, hi, coverage = median_ci_ranks(len(ordered), confidence)
    return Summary(
        n=len(ordered),
        median=med,
        mad=mad,
        mean=statistics.fmean(ordered),
        minimum=ordered[0],
        maximum=ordered[-1],
        ci_low=ordered[lo],
        ci_high=ordered[hi],
        confidence=coverage,
    )


def warmup_is_stable(values: Sequence[float], *, window: int = 3, tolerance: float = 0.05) -> bool:
    """True when the last ``window`` warm-up results agree within ``tolerance`` of their median and
    are not still climbing (a monotone rise means caches and page tables are still filling)."""
    if len(values) < window:
        return False
    tail = [float(v) for v in values[-window:]]
    centre = statistics.median(tail)
    if centre <= 0:
        return False
    spread = (max(tail) - min(tail)) / centre
    rising = all(b > a for a, b in itertools.pairwise(tail))
    climbing = rising and (tail[-1] - tail[0]) / tail[0] > tolerance / 2.0
    return spread <= tolerance and not climbing


@dataclass(frozen=True)
class StopRule:
    """When a trial has measured enough."""

    min_samples: int = 5
    max_samples: int = 30
    target_rel_ci: float = 0.02  # stop when the median's CI half-width is within 2% of the median
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.min_samples < MIN_SAMPLES or self.max_samples < self.min_samples:
            raise ValueError(f"need {MIN_SAMPLES} <= min_samples <= max_samples")
        if not 0 < self.target_rel_ci < 1:
            raise ValueError("target_rel_ci must be in (0, 1)")


def sampling_should_stop(samples: Sequence[float], rule: StopRule) -> str | None:
    """The reason to stop sampling (``"ci-narrow"`` or ``"max-samples"``), or None to go on."""
    n = len(samples)
    if n >= rule.max_samples:
        return "max-samples"
    if n < rule.min_samples:
        return None
    if summarize(samples, rule.confidence).rel_ci_halfwidth <= rule.target_rel_ci:
        return "ci-narrow"
    return None


@dataclass(frozen=True)
class Comparison:
    """Candidate vs baseline from paired, interleaved rounds. ``ratio`` > 1 means the candidate is faster."""

    rounds: int
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    alpha: float  # the family-wise level asked for
    min_effect: float
    significant: bool
    comparisons: int = 1  # candidates compared with the same baseline: the test runs at alpha / comparisons
    # Rounds after which the same mean and spread would be significant; None when already significant, when the
    # candidate is not ahead by the minimum effect, or when no round count up to MAX_ROUNDS_TO_SETTLE would do.
    rounds_to_settle: int | None = None

    @property
    def improvement(self) -> float:
        return self.ratio - 1.0

    @property
    def trending(self) -> bool:
        """Ahead by at least the minimum effect, and likely faster (p below :data:`TREND_P`), yet not proven:
        what more rounds could settle, unlike a candidate that is simply no better."""
        return (not self.significant and self.ratio >= 1.0 + self.min_effect and self.p_value < TREND_P)

    @property
    def level(self) -> float:
        """The level the test actually used: ``p_value`` is compared with it, and the interval is the two-sided
        ``1 - level`` interval (Bonferroni over :attr:`comparisons`)."""
        return self.alpha / self.comparisons

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {
            "rounds": self.rounds,
            "ratio": self.ratio,
            "improvement": self.improvement,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "comparisons": self.comparisons,
            "level": self.level,
            "ci_confidence": 1.0 - self.level,
            "min_effect": self.min_effect,
            "significant": self.significant,
            "trending": self.trending,
            "rounds_to_settle": self.rounds_to_settle,
        }


def compare_paired(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    alpha: float = ALPHA,
    comparisons: int = 1,
    min_effect: float = MIN_EFFECT,
) -> Comparison:
    """Is ``candidate`` faster than ``baseline``? Round ``i`` of each was measured back to back.

    The test works on per-round log ratios, so a slow phase of the machine that hits both configurations
    of a round cancels out. The interval is Student's t on the mean log ratio at level
    ``1 - alpha / comparisons`` (Bonferroni over the candidates compared to the same baseline), one-sided
    p-value for "candidate is faster". A winner must be significant *and* at least ``min_effect`` faster
    (a 0.3% gain is not worth a configuration change).
    """
    cand = _check_samples(candidate)
    base = _check_samples(baseline)
    if len(cand) != len(base):
        raise ValueError("paired comparison needs the same number of rounds")
    if len(cand) < 2:
        raise ValueError("need at least 2 rounds")
    if any(v <= 0 for v in cand + base):
        raise ValueError("throughput samples must be positive")
    if comparisons < 1:
        raise ValueError("comparisons must be >= 1")
    logs = [math.log(c / b) for c, b in zip(cand, base, strict=True)]
    n = len(logs)
    mean = statistics.fmean(logs)
    sd = statistics.stdev(logs)
    level = alpha / comparisons  # Comparison.level: what the result file records is what is tested here
    if sd == 0.0:
        low = high = mean
        p_value = 0.0 if mean > 0 else 1.0
    else:
        se = sd / math.sqrt(n)
        student_t = _scipy_stats().t
        t_crit = float(student_t.ppf(1.0 - level / 2.0, n - 1))
        low, high = mean - t_crit * se, mean + t_crit * se
        p_value = float(student_t.sf(mean / se, n - 1))
    ratio = math.exp(mean)
    significant = low > 0.0 and p_value < level and ratio >= 1.0 + min_effect
    settle = None if significant or ratio < 1.0 + min_effect else rounds_to_settle(mean, sd, n, level)
    return Comparison(
        rounds=n,
        ratio=ratio,
        ci_low=math.exp(low),
        ci_high=math.exp(high),
        p_value=p_value,
        alpha=alpha,
        min_effect=min_effect,
        significant=significant,
        comparisons=comparisons,
        rounds_to_settle=settle,
    )


TREND_P = 0.2  # one-sided p below which an unproven lead counts as a trend worth more rounds
MAX_ROUNDS_TO_SETTLE = 60  # beyond this a "trend" is noise for any budget a user would give


def rounds_to_settle(mean: float, sd: float, rounds: int, level: float) -> int | None:
    """The fewest rounds after which a candidate with this mean log ratio and spread would be significant (its
    two-sided ``1 - level`` interval clear of zero), if more rounds show what these did. Pure."""
    if mean <= 0.0 or sd <= 0.0:
        return None
    student_t = _scipy_stats().t
    for n in range(rounds + 1, MAX_ROUNDS_TO_SETTLE + 1):
        if mean / (sd / math.sqrt(n)) > float(student_t.ppf(1.0 - level / 2.0, n - 1)):
            return n
    return None


def student_t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(_scipy_stats().t.ppf(q, df))


def geometric_mean(values: Sequence[float]) -> float:
    vals = _check_samples(values)
    if any(v <= 0 for v in vals):
        raise ValueError("geometric mean needs positive values")
    return math.exp(statistics.fmean(math.log(v) for v in vals))
