"""What this host is: topology, ISA, memory, kernel settings and measured memory bandwidth.

Public surface (implementations live in the submodules):

* :func:`read_host` reads /sys and /proc under a root (``/`` or a fixture tree), never measures;
* :func:`probe_host` probes the running machine and adds its measured, cached memory bandwidth;
* :func:`select_cpus` / :func:`max_threads` choose the CPUs of a trial from the topology;
* the dataclasses of :mod:`tuner.probe.host`.
"""

from tuner.host_sysfs import Cpu, NumaNode, Topology
from tuner.probe.bandwidth import BandwidthError, measure_bandwidth
from tuner.probe.collect import probe_host, read_host
from tuner.probe.host import BandwidthResult, HostProbe, KernelSettings
from tuner.probe.placement import PLACEMENT_MODES, PlacementMode, max_threads, select_cpus

__all__ = [
    "PLACEMENT_MODES",
    "BandwidthError",
    "BandwidthResult",
    "Cpu",
    "HostProbe",
    "KernelSettings",
    "NumaNode",
    "PlacementMode",
    "Topology",
    "max_threads",
    "measure_bandwidth",
    "probe_host",
    "read_host",
    "select_cpus",
]
