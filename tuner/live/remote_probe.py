"""A host's hardware, read over a shell: the files :mod:`tuner.probe`'s parsers read, gathered by the host's own
python3 and parsed here by the same parsers as a local probe (pure: the caller runs the collector)."""

from __future__ import annotations

import dataclasses
import fnmatch
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tuner.probe.collect import read_host
from tuner.probe.host import HostProbe

PROBE_GLOBS: tuple[str, ...] = (
    "/proc/meminfo", "/proc/cpuinfo", "/proc/sys/kernel/hostname", "/proc/sys/kernel/osrelease",
    "/proc/sys/kernel/numa_balancing", "/proc/sys/vm/zone_reclaim_mode",
    "/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag",
    "/sys/kernel/mm/hugepages/*/nr_hugepages", "/sys/kernel/mm/hugepages/*/free_hugepages",
    "/sys/devices/system/cpu/online", "/sys/devices/system/cpu/possible", "/sys/devices/system/cpu/present",
    "/sys/devices/system/cpu/smt/control", "/sys/devices/system/cpu/smt/active",
    "/sys/devices/system/cpu/cpu[0-9]*/online", "/sys/devices/system/cpu/cpu[0-9]*/topology/*",
    "/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*/*",
    "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor",
    "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/energy_performance_preference",
    "/sys/devices/system/node/online", "/sys/devices/system/node/possible",
    "/sys/devices/system/node/node[0-9]*/cpulist", "/sys/devices/system/node/node[0-9]*/meminfo",
    "/sys/devices/system/node/node[0-9]*/distance",
    "/sys/devices/system/node/node[0-9]*/hugepages/*/nr_hugepages",
    "/sys/devices/system/node/node[0-9]*/hugepages/*/free_hugepages",
)

# Runs on the host's own python3 (the role needs one anyway), standard library only: every readable file
# matching the globs, as JSON.
PROBE_COLLECTOR = """
import glob, json, sys
out = {}
for pattern in json.loads(sys.argv[1]):
    for path in glob.glob(pattern):
        try:
            with open(path, encoding="utf-8") as handle:
                out[path] = handle.read()
        except (OSError, UnicodeDecodeError):
            pass
print(json.dumps(out))
"""


def probe_from_files(files: Mapping[str, str]) -> HostProbe:
    """A :class:`HostProbe` from the host's files (path -> text), through the same parsers as a local probe.

    The service gets its CPUs and memory-lock limit from systemd (the trial drop-in sets CPUAffinity=
    and LimitMEMLOCK=), so what a probing process may do there says nothing about it: any CPU may be
    used and memory may be locked."""
    with tempfile.TemporaryDirectory(prefix="llamahost-remote-probe-") as root:
        for path, text in files.items():
            if not any(fnmatch.fnmatchcase(path, pattern) for pattern in PROBE_GLOBS) or ".." in path:
                continue
            target = Path(root) / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        probe = read_host(root)
    kernel = dataclasses.replace(probe.kernel, memlock_limit_bytes=None, can_lock_memory=True,
                                 memlock_limit_known=True)
    warnings = tuple(w for w in probe.warnings if "RLIMIT_MEMLOCK" not in w and "this process" not in w)
    return dataclasses.replace(probe, kernel=kernel, allowed_cpus=None, warnings=warnings)
