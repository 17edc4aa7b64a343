"""Which logical CPUs a trial with N threads runs on: pure functions of the topology.

The unit of choice is the physical core. ``smt=False`` takes one CPU per core (its first logical CPU,
the one Linux numbers lowest); ``smt=True`` takes all of a core's siblings, one after the other, before
moving to the next core, so N threads occupy ceil(N / threads_per_core) cores.

The order in which cores are taken:

* **compact**: fill one last-level-cache domain (an EPYC CCX, a Xeon socket), then the next LLC domain on
  the same NUMA node, then the next node. Threads share caches and local memory; few memory channels.
* **scatter**: round-robin across NUMA nodes and, within a node, across its LLC domains: the first core
  of each node's first LLC domain, then of each node's second LLC domain, ... Threads reach every node's
  memory channels and every cache slice.

Nodes, LLC domains and cores are visited in increasing index order and nodes without CPUs are skipped,
so the result is deterministic, and ``select_cpus(t, n)`` is always a prefix of ``select_cpus(t, n + 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, zip_longest
from typing import Literal

from tuner.host_sysfs import Cpu, Topology

PlacementMode = Literal["compact", "scatter"]
PLACEMENT_MODES: tuple[PlacementMode, ...] = ("compact", "scatter")


def max_threads(topology: Topology, smt: bool) -> int:
    """How many threads :func:`select_cpus` can place: physical cores, or all logical CPUs with SMT."""
    return len(topology.cpus) if smt else topology.physical_core_count


def _round_robin(groups: Sequence[Sequence[int]]) -> list[int]:
    """``[[a1, a2], [b1], [c1, c2]]`` -> ``[a1, b1, c1, a2, c2]``."""
    return [item for item in chain.from_iterable(zip_longest(*groups)) if item is not None]


def _cores_by_node_and_llc(topology: Topology) -> dict[int, dict[int, list[int]]]:
    """node -> LLC domain -> physical cores, every level in increasing index order."""
    first_cpu: dict[int, Cpu] = {}
    for cpu in sorted(topology.cpus, key=lambda c: c.id):
        first_cpu.setdefault(cpu.core, cpu)
    grouped: dict[int, dict[int, list[int]]] = {}
    for core in sorted(first_cpu):
        cpu = first_cpu[core]
        grouped.setdefault(cpu.node, {}).setdefault(cpu.llc, []).append(core)
    return {node: dict(sorted(llcs.items())) for node, llcs in sorted(grouped.items())}


def core_order(topology: Topology, placement: PlacementMode) -> list[int]:
    """Physical cores in the order ``placement`` takes them."""
    grouped = _cores_by_node_and_llc(topology)
    if placement == "compact":
        return [core for llcs in grouped.values() for cores in llcs.values() for core in cores]
    if placement == "scatter":
        per_node = [_round_robin(list(llcs.values())) for llcs in grouped.values()]
        return _round_robin(per_node)
    raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENT_MODES)}")


def select_cpus(topology: Topology, count: int, *, smt: bool, placement: PlacementMode) -> tuple[int, ...]:
    """``count`` logical CPUs for ``count`` threads, in the order they are taken (see module docstring).

    Raises ``ValueError`` when ``count`` is below 1 or above :func:`max_threads`, or for an unknown
    placement.
    """
    available = max_threads(topology, smt)
    if count < 1 or count > available:
        kind = "logical CPUs" if smt else "physical cores (SMT off)"
        raise ValueError(f"cannot place {count} threads: this host has {available} {kind}")
    siblings = topology.cores()
    cpus = chain.from_iterable(
        siblings[core] if smt else siblings[core][:1] for core in core_order(topology, placement))
    return tuple(cpus)[:count]
