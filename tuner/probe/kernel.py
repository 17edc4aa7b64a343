"""Kernel settings that move llama.cpp throughput, read from /sys and /proc.

* Transparent huge pages (``enabled``/``defrag``: the bracketed word is the active mode);
* ``kernel.numa_balancing`` (ggml warns when it is on: it migrates pages under a pinned process) and
  ``vm.zone_reclaim_mode``;
* SMT control (``on``, ``off``, ``forceoff``, ``notsupported``, ``notimplemented``);
* cpufreq governor and energy-performance preference, counted per value over the online CPUs;
* host-wide hugepages per page size;
* RLIMIT_MEMLOCK of *this* process (from /proc/self/limits) and whether it holds CAP_IPC_LOCK (bit 14 of
  CapEff in /proc/self/status): llama.cpp's mlock load mode needs one of the two. A service started by
  systemd gets its own limit (LimitMEMLOCK=), so this describes the process that runs the probe.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from tuner.host_sysfs import CPU_DIR, HOST_HUGEPAGES_DIR, HostFiles, hugepages_in, tolerant_cpu_list
from tuner.probe.host import KernelSettings

THP_DIR = "/sys/kernel/mm/transparent_hugepage"
CAP_IPC_LOCK = 14
_BRACKETED = re.compile(r"\[([^\]]+)\]")
_MEMLOCK = re.compile(r"^Max locked memory\s+(\S+)\s+(\S+)", re.MULTILINE)


def active_choice(text: str | None) -> str | None:
    """``always [madvise] never`` -> ``madvise``; a file without brackets is returned as is."""
    if text is None:
        return None
    match = _BRACKETED.search(text)
    return match.group(1) if match else (text or None)


def parse_memlock_limit(limits_text: str | None) -> tuple[bool, int | None]:
    """/proc/self/limits -> (known, soft limit in bytes or ``None`` for unlimited)."""
    match = _MEMLOCK.search(limits_text or "")
    if not match:
        return False, None
    soft = match.group(1)
    if soft == "unlimited":
        return True, None
    try:
        return True, int(soft)
    except ValueError:
        return False, None


def has_capability(status_text: str | None, capability: int) -> bool:
    """Whether ``CapEff`` in /proc/<pid>/status has ``capability`` (a bit number from linux/capability.h)."""
    for line in (status_text or "").splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> capability & 1)
            except (IndexError, ValueError):
                return False
    return False


def count_per_value(files: HostFiles, cpus: Sequence[int], name: str) -> dict[str, int]:
    """How many online CPUs report each value of ``cpuN/cpufreq/<name>``; empty if none expose it."""
    counts = Counter(
        value for cpu in cpus if (value := files.text(f"{CPU_DIR}/cpu{cpu}/cpufreq/{name}"))
    )
    return dict(sorted(counts.items()))


def read_kernel_settings(files: HostFiles, cpus: Sequence[int], warnings: list[str]) -> KernelSettings:
    """Read the kernel knobs of the host behind ``files``; anything hidden is ``None`` or empty."""
    limits_known, memlock = parse_memlock_limit(files.text("/proc/self/limits"))
    if not limits_known:
        warnings.append("RLIMIT_MEMLOCK unknown (/proc/self/limits unreadable): mlock treated as unavailable")
    status = files.text("/proc/self/status")
    can_lock = (limits_known and memlock is None) or has_capability(status, CAP_IPC_LOCK)
    total, free = hugepages_in(files, HOST_HUGEPAGES_DIR)
    return KernelSettings(
        thp_enabled=active_choice(files.text(f"{THP_DIR}/enabled")),
        thp_defrag=active_choice(files.text(f"{THP_DIR}/defrag")),
        numa_balancing=files.integer("/proc/sys/kernel/numa_balancing"),
        zone_reclaim_mode=files.integer("/proc/sys/vm/zone_reclaim_mode"),
        smt_control=files.text(f"{CPU_DIR}/smt/control"),
        governors=count_per_value(files, cpus, "scaling_governor"),
        energy_performance_preference=count_per_value(files, cpus, "energy_performance_preference"),
        hugepages_total=total,
        hugepages_free=free,
        memlock_limit_bytes=memlock,
        can_lock_memory=can_lock,
        memlock_limit_known=limits_known,
    )


def allowed_cpus(files: HostFiles) -> tuple[int, ...] | None:
    """CPUs this process may run on (``Cpus_allowed_list``: its affinity within its cgroup cpuset)."""
    for line in (files.text("/proc/self/status") or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return tolerant_cpu_list(line.partition(":")[2])
    return None
