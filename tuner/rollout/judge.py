"""Is a host slower, or less healthy, after a rollout than it was just before? (pure)

A canary cannot be measured in interleaved rounds like the proof: "after" exists only once the change is
applied. Its windows are compared with the same host's windows from just before the change, as two
independent samples: Welch's t-test on log window throughputs (one-sided: "after is slower"). Reverting is
the safe side, so the rule is strict: the canary fails when its median throughput fell by more than
``max_slowdown`` (significant or not: a few windows cannot prove much, and a big drop is not worth the
risk), or when it is significantly slower by more than the noise floor ``tolerance``, or when more of its
requests failed than before (beyond ``max_error_rate``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.errors import UserError


@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary fails; the playbook's ``tune_canary_*`` variables set these."""

    max_slowdown: float = 0.05  # a fall of the median throughput beyond this fails the canary
    alpha: float = 0.05  # the level of the one-sided "after is slower" test
    tolerance: float = 0.01  # a significant fall smaller than this is noise, not a regression
    max_error_rate: float = 0.0  # failed requests allowed after, beyond the share that failed before

    def __post_init__(self) -> None:
        if not 0 < self.max_slowdown < 1 or not 0 < self.alpha < 1 or not 0 <= self.tolerance < 1 \
                or not 0 <= self.max_error_rate < 1:
            raise UserError("canary thresholds are fractions: max_slowdown and alpha in (0, 1), tolerance and "
                            "max_error_rate in [0, 1)", "pass e.g. max_slowdown 0.05, alpha 0.05")


@dataclass(frozen=True)
class Windows:
    """What one measurement of a host saw: aggregate generated tok/s per window, and the request tally."""

    throughputs: tuple[float, ...]
    requests: int
    errors: int

    @classmethod
    def from_report(cls, report: dict[str, Any], *, origin: str) -> Windows:
        """From the on-host measurement's JSON (:mod:`tuner.rollout.on_host`)."""
        try:
            windows = report["windows"]
            throughputs = tuple(float(w["throughput_tps"]) for w in windows)
            requests = sum(int(w["requests"]) for w in windows)
            errors = sum(int(w["errors"]) for w in windows)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"the measurement of {origin} is not readable", "check the canary's output above") from None
        if len(throughputs) < 2:
            raise UserError(f"the measurement of {origin} has {len(throughputs)} window(s); a comparison needs 2 "
                            "or more", "set tune_canary_windows to 3 or more")
        return cls(throughputs=throughputs, requests=requests, errors=errors)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 1.0

    @property
    def median(self) -> float:
        return statistics.median(self.throughputs)


@dataclass(frozen=True)
class CanaryVerdict:
    passed: bool
    ratio: float  # median after / median before; < 1 is slower
    p_value: float  # one-sided, "after is slower"
    reasons: tuple[str, ...]  # why it failed; empty when it passed
    before: Windows
    after: Windows

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "ratio": self.ratio, "p_value": self.p_value, "reasons": list(self.reasons),
                "before": {"throughputs": list(self.before.throughputs), "median": self.before.median,
                           "requests": self.before.requests, "errors": self.before.errors},
                "after": {"throughputs": list(self.after.throughputs), "median": self.after.median,
                          "requests": self.after.requests, "errors": self.after.errors}}


def _p_slower(before: Sequence[float], after: Sequence[float]) -> float:
    """One-sided Welch t-test p-value for "after is slower", on log throughputs (ratios, not differences)."""
    from scipy import stats

    if min(list(before) + list(after)) <= 0:
        return 0.0 if statistics.median(after) < statistics.median(before) else 1.0
    logs_before = [math.log(v) for v in before]
    logs_after = [math.log(v) for v in after]
    if statistics.pvariance(logs_before) == 0 and statistics.pvariance(logs_after) == 0:
        return 0.0 if statistics.mean(logs_after) < statistics.mean(logs_before) else 1.0
    result = stats.ttest_ind(logs_after, logs_before, equal_var=False, alternative="less")
    return float(result.pvalue)


def judge(before: Windows, after: Windows, policy: CanaryPolicy) -> CanaryVerdict:
    ratio = after.median / before.median if before.median > 0 else (1.0 if after.median > 0 else 0.0)
    p_value = _p_slower(before.throughputs, after.throughputs)
    reasons: list[str] = []
    if ratio < 1 - policy.max_slowdown:
        reasons.append(f"throughput fell to x{ratio:.3f} of before (more than the {policy.max_slowdown:.0%} allowed)")
    elif p_value < policy.alpha and ratio < 1 - policy.tolerance:
        reasons.append(f"throughput is significantly lower, x{ratio:.3f} of before (p={p_value:.3g})")
    allowed = before.error_rate + policy.max_error_rate if before.requests else policy.max_error_rate
    if after.error_rate > allowed:
        reasons.append(f"{after.errors} of {after.requests} requests failed after the change "
                       f"({before.errors} of {before.requests} before)")
    return CanaryVerdict(passed=not reasons, ratio=ratio, p_value=p_value, reasons=tuple(reasons), before=before,
                         after=after)
