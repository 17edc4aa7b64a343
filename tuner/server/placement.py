"""Where a server's threads run and where its memory lives, decided before the process starts.

llama-server has no CPU-mask flag that covers every thread it starts, and no memory-policy flag at all,
so both are applied to the process from outside, before ``main`` runs and therefore before the model is
loaded: the CPU affinity is set in the child between fork and exec (inherited by every thread), and a
memory policy (interleave or bind over NUMA nodes) comes from ``numactl`` placed in front of the binary.
The same settings become systemd's ``CPUAffinity=`` and ``NUMAPolicy=`` on hosts (see RunConfig.role_vars).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from tuner.config import RunConfig
from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError
from tuner.probe.collect import read_host

_NUMACTL_POLICY = {"interleave": "--interleave", "bind": "--membind"}


@dataclass(frozen=True)
class ProcessPlacement:
    """How to start one server process: an affinity to set in the child, and a launcher prefix."""

    cpus: tuple[int, ...]  # empty: leave the inherited affinity alone
    launcher: tuple[str, ...]  # e.g. ("/usr/bin/numactl", "--interleave=0,1"); empty: none needed

    def describe(self) -> str:
        parts = [f"CPUs {format_cpu_list(self.cpus)}" if self.cpus else "CPUs unpinned"]
        parts.append(" ".join(self.launcher[1:]) if self.launcher else "default memory policy")
        return ", ".join(parts)


def plan_placement(config: RunConfig, *, node_cpus: Mapping[int, tuple[int, ...]],
                   allowed_cpus: frozenset[int], numactl: str | None) -> ProcessPlacement:
    """Decide affinity and launcher for ``config`` on a host described by the arguments (no I/O)."""
    unavailable = sorted(set(config.cpus) - allowed_cpus)
    if unavailable:
        raise UserError(f"CPUs {format_cpu_list(unavailable)} of the CPU list {format_cpu_list(config.cpus)} "
                        f"are not available here (this process may use {format_cpu_list(allowed_cpus)})",
                        "pick CPUs from the available list")
    if config.memory_policy == "default":
        return ProcessPlacement(cpus=config.cpus, launcher=())
    cpu_nodes = tuple(sorted(node for node, cpus in node_cpus.items() if set(cpus) & set(config.cpus)))
    nodes = config.memory_nodes or cpu_nodes or tuple(sorted(node_cpus))
    unknown = sorted(set(nodes) - set(node_cpus))
    if unknown:
        raise UserError(f"memory nodes {format_cpu_list(unknown)} do not exist on this host "
                        f"(nodes: {format_cpu_list(node_cpus)})", "set memory_nodes to existing NUMA nodes")
    if numactl is None:
        raise UserError(f"memory policy {config.memory_policy!r} is applied with numactl, which is not installed",
                        "install it (apt-get install numactl), or use memory_policy 'default'")
    flag = _NUMACTL_POLICY[config.memory_policy]
    return ProcessPlacement(cpus=config.cpus, launcher=(numactl, f"{flag}={format_cpu_list(nodes)}"))


def placement_for(config: RunConfig) -> ProcessPlacement:
    """:func:`plan_placement` for this machine (topology from the host probe)."""
    topology = read_host().topology
    return plan_placement(config, node_cpus={node.id: node.cpus for node in topology.nodes},
                          allowed_cpus=frozenset(os.sched_getaffinity(0)), numactl=shutil.which("numactl"))
