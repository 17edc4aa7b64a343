"""What a host is, as plain data: topology, ISA, memory, kernel settings, measured bandwidth.

These dataclasses are the contract between the probe (which reads /sys and /proc), the search space
(which derives its dimensions from them), the trial runner (which pins CPUs and memory with them), and
the result file (which records them). They hold no I/O. The topology's own classes (``Cpu``, ``NumaNode``,
``Topology``) live with their readers in :mod:`tuner.host_sysfs`, which the collection's ``host_topology``
module shares.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tuner.host_sysfs import Topology, int_keys


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
    memlock_limit_bytes: int | None = None  # None = unlimited (or unknown: see memlock_limit_known)
    can_lock_memory: bool = False  # unlimited RLIMIT_MEMLOCK or CAP_IPC_LOCK
    memlock_limit_known: bool = True  # False when /proc/self/limits could not be read

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelSettings:
        values = dict(data)
        for name in ("hugepages_total", "hugepages_free"):
            values[name] = int_keys(values.get(name, {}))
        return cls(**values)


CONTENDED_CPU_SHARE = 0.9


@dataclass(frozen=True)
class BandwidthResult:
    """Measured memory read bandwidth in GB/s (10^9 bytes per second).

    ``all_nodes_gbps`` and ``per_node_gbps`` are medians of the samples; ``threads`` is the number of
    worker processes (one per physical core) in the all-nodes measurement and ``buffer_bytes`` the
    buffer each of them streams over. See :mod:`tuner.probe.bandwidth`.
    """

    all_nodes_gbps: float
    per_node_gbps: dict[int, float]
    threads: int
    buffer_bytes: int
    samples_gbps: tuple[float, ...] = ()  # the all-nodes samples
    method: str = ""
    per_node_samples_gbps: dict[int, tuple[float, ...]] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the whole measurement, worker start-up included
    measured_at: str = ""  # ISO 8601 UTC
    # median share of their sample windows the workers spent on a CPU; well below 1: other load competed
    cpu_share: float = 1.0
    # all_nodes_gbps of every uncontended measurement of this host kept in the cache, oldest first: the figure
    # used as the host's bandwidth is the best of them (tuner.probe.bandwidth_cache); empty for a single one
    runs_gbps: tuple[float, ...] = ()

    @property
    def contended(self) -> bool:
        """Other processes took a noticeable share of the CPUs while this was measured: it is too low."""
        return self.cpu_share < CONTENDED_CPU_SHARE

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BandwidthResult:
        return cls(
            all_nodes_gbps=float(data["all_nodes_gbps"]),
            per_node_gbps={int(k): float(v) for k, v in data["per_node_gbps"].items()},
            threads=int(data["threads"]),
            buffer_bytes=int(data["buffer_bytes"]),
            samples_gbps=tuple(float(x) for x in data.get("samples_gbps", ())),
            method=str(data.get("method", "")),
            per_node_samples_gbps={
                int(k): tuple(float(x) for x in v) for k, v in data.get("per_node_samples_gbps", {}).items()
            },
            seconds=float(data.get("seconds", 0.0)),
            measured_at=str(data.get("measured_at", "")),
            cpu_share=float(data.get("cpu_share", 1.0)),
            runs_gbps=tuple(float(x) for x in data.get("runs_gbps", ())),
        )


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
    architecture: str = ""  # "x86_64", "aarch64" or "unknown"
    # CPUs this process may run on (affinity within its cpuset); None when unknown
    allowed_cpus: tuple[int, ...] | None = None
    # what could not be read or does not add up; unsupported hardware is reported here, not raised
    warnings: tuple[str, ...] = ()

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostProbe:
        """Inverse of :meth:`to_dict` (also after a JSON round trip, which turns int keys into strings)."""
        bandwidth = data.get("bandwidth")
        allowed = data.get("allowed_cpus")
        return cls(
            hostname=data["hostname"],
            kernel_release=data["kernel_release"],
            cpu_vendor=data["cpu_vendor"],
            cpu_model=data["cpu_model"],
            isa=tuple(data["isa"]),
            topology=Topology.from_dict(data["topology"]),
            kernel=KernelSettings.from_dict(data["kernel"]),
            memory_total_bytes=int(data["memory_total_bytes"]),
            memory_available_bytes=int(data["memory_available_bytes"]),
            bandwidth=BandwidthResult.from_dict(bandwidth) if bandwidth else None,
            architecture=str(data.get("architecture", "")),
            allowed_cpus=tuple(allowed) if allowed is not None else None,
            warnings=tuple(data.get("warnings", ())),
        )
