"""One contract for every server control the live tuner drives (tuner.live.control.ServerControl).

The live run relies on the same four promises from the local supervisor (tuner.live.local.LocalServer,
tests/live/test_local_live.py) and the systemd unit on a host (tuner.live.unit.SystemdServer,
tests/lab/test_live_systemd.py): a trial runs and the baseline comes back; a configuration that cannot start
is reported and the baseline comes back; a second tuner is refused at once; a controller that goes quiet gets
the baseline back from the dead-man switch. Each backend's test module builds a :class:`ControlUnderTest` and
calls these checks, so a promise is written once and a backend cannot keep a weaker copy of it.

What runs is read from the host itself (``runs``: /proc on this machine, systemd and /proc on the lab), never
from the control's own bookkeeping.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import pytest

from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.live.control import ServerControl, TrialStartFailed


@dataclass(frozen=True)
class ControlUnderTest:
    name: str  # the backend, for failure messages
    control: ServerControl
    baseline: RunConfig  # what the control was started with
    trial: RunConfig  # a configuration that starts and differs from the baseline in what ``runs`` reads
    unstartable: RunConfig  # one whose server cannot come up: a KV cache far beyond the host's memory
    runs: Callable[[RunConfig], bool]  # the host runs this configuration now, healthy (read from the host)
    second_tuner: Callable[[], AbstractContextManager[object]]  # a second tuner taking the host's lock
    refusal: str  # what that second tuner is told (a regular expression)
    refused_within_s: float  # refused at once, not queued behind the first: the bound tells the two apart
    dead_man_within_s: float  # the dead-man limit plus a restart


def wait_until_running(subject: ControlUnderTest, config: RunConfig, timeout_s: float) -> float:
    """Seconds until the host runs ``config``; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while not subject.runs(config):
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{subject.name} did not run {config.key()} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def check_a_trial_runs_and_the_baseline_comes_back(subject: ControlUnderTest, *,
                                                    on_trial: Callable[[], None] = lambda: None,
                                                    on_baseline: Callable[[], None] = lambda: None) -> None:
    """``on_trial`` and ``on_baseline`` add the backend's own checks of each state (its placement, its unit file),
    so a backend checks more on the same restarts instead of paying for more."""
    assert subject.runs(subject.baseline) and not subject.runs(subject.trial)
    subject.control.apply(subject.trial)
    assert subject.runs(subject.trial) and not subject.runs(subject.baseline)
    on_trial()
    subject.control.restore_baseline()
    assert subject.runs(subject.baseline) and not subject.runs(subject.trial)
    on_baseline()


def check_a_configuration_that_cannot_start_is_reported_and_the_baseline_comes_back(
        subject: ControlUnderTest) -> TrialStartFailed:
    """Returns the failure, for the backend's own checks of what it says (the journal, the log)."""
    with pytest.raises(TrialStartFailed, match="did not come up") as failure:
        subject.control.apply(subject.unstartable)
    subject.control.restore_baseline()
    assert subject.runs(subject.baseline)
    return failure.value


def check_a_second_tuner_is_refused_at_once(subject: ControlUnderTest) -> None:
    started = time.monotonic()
    with pytest.raises(UserError, match=re.compile(subject.refusal)), subject.second_tuner():
        pass
    assert time.monotonic() - started < subject.refused_within_s
    assert subject.runs(subject.baseline), "the refused tuner changed nothing"


def check_the_dead_man_switch_restores_the_baseline(subject: ControlUnderTest, trial_then_silence: Callable[[], None],
                                                    *, silent_for_at_least_s: float = 0.0) -> float:
    """``trial_then_silence`` leaves the host on a trial with its controller quiet (no heartbeat from then on, or
    killed); the switch must bring the baseline back by itself, not before ``silent_for_at_least_s``. Returns
    the seconds it took."""
    trial_then_silence()
    waited = wait_until_running(subject, subject.baseline, subject.dead_man_within_s)
    assert waited >= silent_for_at_least_s, f"reverted after {waited:.0f} s: too soon"
    return waited
