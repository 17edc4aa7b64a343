"""Put the readers together: one :class:`HostProbe` for a host, with or without measured bandwidth.

:func:`read_host` only reads files (fast, works on any root, used on fixtures); :func:`probe_host` is
what the tuner calls on the machine it runs on: it adds the measured memory bandwidth, from the cache
when this host (same fingerprint) was measured before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tuner.host_sysfs import HostFiles, parse_meminfo, read_topology
from tuner.probe.bandwidth import DEFAULT_SECONDS
from tuner.probe.bandwidth_cache import cached_or_measured_bandwidth
from tuner.probe.cpuinfo import isa_warnings, read_cpu_identity
from tuner.probe.host import HostProbe
from tuner.probe.kernel import allowed_cpus, read_kernel_settings

LIVE_ROOT = Path("/")


def read_host(root: Path | str = LIVE_ROOT, *, files: HostFiles | None = None) -> HostProbe:
    """Read topology, ISA, memory and kernel settings of the host whose /sys and /proc are under ``root``.

    Never measures and never fails on missing files: what cannot be read is ``None``/empty and, where
    it makes the picture less precise, explained in :attr:`HostProbe.warnings`.
    """
    files = files or HostFiles(root)
    warnings: list[str] = []
    identity = read_cpu_identity(files)
    warnings.extend(isa_warnings(identity))
    meminfo = parse_meminfo(files.text("/proc/meminfo"))
    total = meminfo.get("MemTotal")
    available = meminfo.get("MemAvailable", meminfo.get("MemFree"))
    topology = read_topology(
        files,
        meminfo_total_bytes=total,
        meminfo_free_bytes=meminfo.get("MemFree"),
        cpuinfo=identity.topology,
        warnings=warnings,
    )
    if total is None:
        total = sum(n.memory_total_bytes for n in topology.nodes)
        available = sum(n.memory_free_bytes for n in topology.nodes)
        warnings.append("/proc/meminfo unreadable: memory figures summed from the NUMA nodes"
                        if total else "/proc/meminfo unreadable and no NUMA node memory: memory unknown (0)")
    allowed = allowed_cpus(files)
    if allowed is not None:
        hidden = sorted(set(topology.logical_cpus) - set(allowed))
        if hidden:
            warnings.append(f"this process may not run on online CPUs {hidden} (affinity or cgroup cpuset)")
    kernel = read_kernel_settings(files, topology.logical_cpus, warnings)
    return HostProbe(
        hostname=files.text("/proc/sys/kernel/hostname") or "unknown",
        kernel_release=files.text("/proc/sys/kernel/osrelease") or "unknown",
        cpu_vendor=identity.vendor,
        cpu_model=identity.model,
        isa=identity.isa,
        topology=topology,
        kernel=kernel,
        memory_total_bytes=total,
        memory_available_bytes=available or 0,
        architecture=identity.architecture,
        allowed_cpus=allowed,
        warnings=tuple(warnings),
    )


def probe_host(
    *,
    bandwidth: bool = True,
    remeasure: bool = False,
    bandwidth_seconds: float = DEFAULT_SECONDS,
    cache_dir: Path | None = None,
) -> HostProbe:
    """Probe the machine this runs on; with ``bandwidth``, add its memory read bandwidth.

    The bandwidth comes from ``<cache_dir>/bandwidth-<fingerprint>.json`` when present (default
    :func:`tuner.paths.cache_dir`), else it is measured for about ``bandwidth_seconds`` and cached;
    ``remeasure`` ignores the cache. Raises :class:`tuner.probe.bandwidth.BandwidthError` when the
    measurement cannot run (workers died, not enough free memory).
    """
    probe = read_host(LIVE_ROOT)
    if not bandwidth:
        return probe
    result = cached_or_measured_bandwidth(
        probe, seconds=bandwidth_seconds, remeasure=remeasure, cache_dir=cache_dir)
    return dataclasses.replace(probe, bandwidth=result)
