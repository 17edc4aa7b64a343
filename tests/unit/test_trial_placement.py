"""A trial's CPU mask and memory policy are read back from the kernel: one that did not take is an error,
never a measurement of some other configuration. The masks are set in a child process (this test process keeps
its own affinity)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tuner.trial.placement import PlacementError, check_memory_policy


def pin_in_a_child(cpus: list[int]) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from tuner.trial.placement import pin_to_cpus, PlacementError\n"
            f"try: print(list(pin_to_cpus({cpus!r})))\n"
            "except PlacementError as exc: print(exc, file=sys.stderr); sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


def test_a_mask_inside_the_allowed_cpus_is_applied_and_returned() -> None:
    first = min(os.sched_getaffinity(0))
    done = pin_in_a_child([first])
    assert done.returncode == 0 and done.stdout.strip() == f"[{first}]", done.stderr


def test_a_mask_the_kernel_narrows_is_refused_naming_what_was_applied() -> None:
    """The kernel keeps the CPUs it can and drops the rest without an error: only the read-back notices."""
    first = min(os.sched_getaffinity(0))
    done = pin_in_a_child([first, 4095])
    assert done.returncode == 3, done.stdout
    assert "did not take effect" in done.stderr and f"applied [{first}]" in done.stderr


def test_a_mask_with_no_allowed_cpu_is_refused_naming_the_allowed_ones() -> None:
    done = pin_in_a_child([4095])
    assert done.returncode == 3, done.stdout
    assert "cannot pin to CPUs [4095]" in done.stderr and "may only run on CPUs" in done.stderr


def test_a_memory_policy_is_checked_against_what_the_kernel_reports() -> None:
    check_memory_policy("bind", (1, 1), ("bind", (1,)))
    with pytest.raises(PlacementError, match="did not take effect: the kernel reports default on nodes"):
        check_memory_policy("bind", (1,), ("default", ()))
    with pytest.raises(PlacementError, match="interleave on nodes \\[0, 1\\]"):
        check_memory_policy("interleave", (0, 1), ("interleave", (0,)))
