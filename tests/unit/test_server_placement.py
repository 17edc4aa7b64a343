"""Where a server process runs and allocates: affinity and the numactl launcher (pure planning)."""

from __future__ import annotations

import pytest

from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.server.placement import ProcessPlacement, plan_placement

TWO_NODES = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
ALL = frozenset(range(8))


def plan(
    config: RunConfig, numactl: str | None = "/usr/bin/numactl", allowed: frozenset[int] = ALL
) -> ProcessPlacement:
    return plan_placement(config, node_cpus=TWO_NODES, allowed_cpus=allowed, numactl=numactl)


def test_unpinned_default_needs_nothing() -> None:
    placement = plan(RunConfig(threads=4, threads_batch=4), numactl=None)
    assert placement.cpus == () and placement.launcher == ()


def test_pinning_alone_needs_no_numactl() -> None:
    placement = plan(RunConfig(threads=2, threads_batch=2, cpus=(4, 5), placement="compact"), numactl=None)
    assert placement.cpus == (4, 5) and placement.launcher == ()


def test_memory_policy_defaults_to_the_nodes_of_the_cpus() -> None:
    config = RunConfig(threads=2, threads_batch=2, cpus=(3, 4), placement="scatter", memory_policy="interleave")
    assert plan(config).launcher == ("/usr/bin/numactl", "--interleave=0-1")
    bind = config.with_changes(cpus=(5, 6), memory_policy="bind")
    assert plan(bind).launcher == ("/usr/bin/numactl", "--membind=1")


def test_explicit_memory_nodes_win_and_no_cpus_means_all_nodes() -> None:
    config = RunConfig(threads=2, threads_batch=2, memory_policy="bind", memory_nodes=(0,))
    assert plan(config).launcher == ("/usr/bin/numactl", "--membind=0")
    assert plan(config.with_changes(memory_nodes=())).launcher == ("/usr/bin/numactl", "--membind=0-1")


def test_memory_policy_without_numactl_is_refused() -> None:
    with pytest.raises(UserError, match="numactl, which is not installed"):
        plan(RunConfig(threads=2, threads_batch=2, memory_policy="interleave"), numactl=None)


def test_unknown_nodes_and_unavailable_cpus_are_refused() -> None:
    with pytest.raises(UserError, match="memory nodes 3 do not exist"):
        plan(RunConfig(threads=2, threads_batch=2, memory_policy="bind", memory_nodes=(3,)))
    with pytest.raises(UserError, match=r"CPUs 6-7 .* are not available"):
        plan(RunConfig(threads=2, threads_batch=2, cpus=(6, 7), placement="compact"),
             allowed=frozenset(range(6)))
