"""What a host is, as plain data: topology, ISA, memory, kernel settings, measured bandwidth.

These dataclasses are the contract between the probe (which reads /sys and /proc), the search space
(which derives its dimensions from them), the trial runner (which pins CPUs and memory with them), and
the result file (which records them). They hold no I/O; see :mod:`tuner.probe.sysfs` for the readers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cpu:
    """One logical CPU. ``core`` is a host-wide physical core index: SMT siblings share it."""

    id: int
    core: int
    socket: int
    node: int
    llc: int


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    memory_total_bytes: int
    memory_free_bytes: int
    # page size in KiB -> number of reserved pages on this node
    hugepages_total: dict[int, int] = field(default_factory=dict)
    hugepages_free: dict[int, int] = field(default_factory=dict)
    distances: tuple[int, ...] = ()


@dataclass(frozen=True)
class Topology:
    """Online CPUs and NUMA nodes. Every query the tuner needs is derived here, once."""

    cpus: tuple[Cpu, ...]
    nodes: tuple[NumaNode, ...]

    @property
    def logical_cpus(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.cpus)

    @property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cpus}))

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    @property
    def llc_domains(self) -> tuple[int, ...]:
        return tuple(sorted({c.llc for c in self.cpus}))

    def cores(self) -> dict[int, tuple[int, ...]]:
        """Physical core -> its logical CPUs (first one is the primary thread)."""
        grouped: dict[int, list[int]] = {}
        for cpu in sorted(self.cpus, key=lambda c: c.id):
            grouped.setdefault(cpu.core, []).append(cpu.id)
        return {core: tuple(ids) for core, ids in sorted(grouped.items())}

    @property
    def physical_core_count(self) -> int:
        return len(self.cores())

    @property
    def threads_per_core(self) -> int:
        return max((len(ids) for ids in self.cores().values()), default=1)

    @property
    def has_smt(self) -> bool:
        return self.threads_per_core > 1

    def cpu(self, cpu_id: int) -> Cpu:
        for cpu in self.cpus:
            if cpu.id == cpu_id:
                return cpu
        raise KeyError(cpu_id)

    def nodes_of(self, cpu_ids: Iterable[int]) -> tuple[int, ...]:
        by_id = {c.id: c for c in self.cpus}
        return tuple(sorted({by_id[i].node for i in cpu_ids}))


@dataclass(frozen=True)
class KernelSettings:
    """Kernel knobs that move llama.cpp throughput. ``None`` means the host does not expose it."""

    thp_enabled: str | None
    thp_defrag: str | None
    numa_balancing: int | None
    zone_reclaim_mode: int | None
    smt_control: str | None
    governors: dict[str, int] = field(default_factory=dict)  # governor -> number of CPUs using it
    energy_performance_preference: dict[str, int] = field(default_factory=dict)
    hugepages_total: dict[int, int] = field(default_factory=dict)  # page size KiB -> pages, host-wide
    hugepages_free: dict[int, int] = field(default_factory=dict)
    memlock_limit_bytes: int | None = None  # None = unlimited
    can_lock_memory: bool = False  # unlimited RLIMIT_MEMLOCK or CAP_IPC_LOCK


@dataclass(frozen=True)
class BandwidthResult:
    """Measured memory read bandwidth in GB/s (10^9 bytes per second)."""

    all_nodes_gbps: float
    per_node_gbps: dict[int, float]
    threads: int
    buffer_bytes: int
    samples_gbps: tuple[float, ...] = ()
    method: str = ""


@dataclass(frozen=True)
class HostProbe:
    hostname: str
    kernel_release: str
    cpu_vendor: str
    cpu_model: str
    isa: tuple[str, ...]  # flags that matter to llama.cpp, e.g. avx2, avx512f, amx_tile, sve
    topology: Topology
    kernel: KernelSettings
    memory_total_bytes: int
    memory_available_bytes: int
    bandwidth: BandwidthResult | None = None

    def fingerprint_fields(self) -> dict[str, Any]:
        """The hardware facts a tuned configuration depends on. Two hosts with equal fields are
        interchangeable for tuning; anything that varies from run to run (free memory, hostname)
        is left out on purpose."""
        topo = self.topology
        return {
            "cpu_model": self.cpu_model,
            "isa": sorted(self.isa),
            "sockets": len(topo.sockets),
            "numa_nodes": [len(n.cpus) for n in topo.nodes],
            "physical_cores": topo.physical_core_count,
            "logical_cpus": len(topo.cpus),
            "llc_domains": len(topo.llc_domains),
            "memory_gib": round(self.memory_total_bytes / 1024**3),
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fingerprint"] = self.fingerprint()
        return data
