"""The live latency guard: whom it applies to and how long one request may take before it is cut off."""

from __future__ import annotations

from typing import Any

from tuner.config import RunConfig
from tuner.live.measure import MIN_REQUEST_DEADLINE_S, Guards, LiveMeasurer, LiveObjective, LiveSettings
from tuner.live.workload import make_request_mix

BASELINE = RunConfig(threads=2, threads_batch=2, parallel=1, ctx_size=512)
TRIAL = RunConfig(threads=1, threads_batch=1, parallel=2, ctx_size=1024)


def measurer(**guards: Any) -> LiveMeasurer:
    mix = make_request_mix("chat", concurrency=2, count=4, scale=0.1)
    return LiveMeasurer(None, mix, LiveObjective("throughput"), LiveSettings(), Guards(**guards))  # type: ignore[arg-type]


def test_nothing_is_guarded_before_the_baseline_is_measured() -> None:
    live = measurer()
    assert live.request_deadline(TRIAL) is None and live.request_deadline(BASELINE) is None


def test_the_baseline_is_never_held_to_a_limit_measured_on_itself() -> None:
    live = measurer(latency_multiple=3.0)
    live.baseline, live.baseline_latency_p95 = BASELINE, 0.3
    assert live.request_deadline(BASELINE) is None
    assert live.request_deadline(RunConfig(threads=2, threads_batch=2, parallel=1, ctx_size=512)) is None  # equal


def test_a_trial_request_is_cut_off_at_twice_the_latency_guard_but_never_too_soon() -> None:
    live = measurer(latency_multiple=3.0)
    live.baseline, live.baseline_latency_p95 = BASELINE, 5.0
    assert live.request_deadline(TRIAL) == 30.0  # 2 x (3 x 5 s)
    live.baseline_latency_p95 = 0.3
    assert live.request_deadline(TRIAL) == MIN_REQUEST_DEADLINE_S
