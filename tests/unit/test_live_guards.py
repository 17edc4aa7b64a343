"""The live guards: whom the latency guard applies to, how long one request may take before it is cut off, and
what a missed heartbeat does to the trial it crossed."""

from __future__ import annotations

from typing import Any

import pytest

from tuner.config import RunConfig
from tuner.errors import TrialFailed, UserError
from tuner.live.measure import MIN_REQUEST_DEADLINE_S, Guards, Heartbeat, LiveMeasurer, LiveObjective, LiveSettings
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


# ---- the heartbeat: missed beats are reported, and a lapse past the dead-man limit voids the trial it crossed ----

class FlakyLink:
    """A server control's heartbeat over a link that can go down (only what Heartbeat calls)."""

    deadman_seconds = 10.0

    def __init__(self) -> None:
        self.down = False

    def heartbeat(self) -> None:
        if self.down:
            raise UserError("on h1, a command failed (255): ssh: connect to host h1 port 22: Connection refused",
                            "check the network")


def beating(link: FlakyLink, now: list[float], misses: list[str]) -> Heartbeat:
    return Heartbeat(link, 1.0, on_miss=misses.append, clock=lambda: now[0])  # type: ignore[arg-type]


def test_a_missed_heartbeat_is_reported_and_counted_and_a_short_silence_is_no_lapse() -> None:
    link, now, misses = FlakyLink(), [0.0], list[str]()
    heartbeat = beating(link, now, misses)
    link.down, now[0] = True, 3.0
    heartbeat.beat()
    assert len(misses) == 1 and "Connection refused" in misses[0] and "silent for 3 s" in misses[0], misses
    link.down, now[0] = False, 4.0
    heartbeat.beat()
    assert not heartbeat.lapsed_since(0.0)
    assert heartbeat.report() == {"interval_s": 1.0, "missed": 1, "lapses": 0,
                                  "last_error": "on h1, a command failed (255): ssh: connect to host h1 port 22: "
                                                "Connection refused"}


def test_a_silence_past_the_dead_man_limit_voids_the_trial_it_crossed_and_no_later_one() -> None:
    link, now, misses = FlakyLink(), [0.0], list[str]()
    heartbeat = beating(link, now, misses)
    live = measurer()
    live.baseline, live.heartbeat = BASELINE, heartbeat
    link.down = True
    for moment in (4.0, 8.0, 12.0):  # silent from 0: past the 10 s limit at 12, so the host could revert from 10
        now[0] = moment
        heartbeat.beat()
    link.down, now[0] = False, 13.0
    heartbeat.beat()
    with pytest.raises(TrialFailed, match="dead-man limit"):
        live._check_heartbeat(TRIAL, since=5.0)  # started before the lapse
    live._check_heartbeat(BASELINE, since=5.0)  # a revert runs the baseline anyway: its numbers stand
    live._check_heartbeat(TRIAL, since=12.5)  # started after the lapse
    assert heartbeat.report()["lapses"] == 1 and heartbeat.report()["missed"] == 3
    link.down, now[0] = True, 24.0  # silent since 13, no beat has run yet: the silence going on now counts
    with pytest.raises(TrialFailed):
        live._check_heartbeat(TRIAL, since=20.0)
