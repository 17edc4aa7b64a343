#!/usr/bin/python3
"""Ansible module: read a Linux host's CPU/NUMA topology and the kernel settings the roles manage.

One call returns everything the roles validate against (nodes, cores, SMT siblings, memory per node,
hugepages per node and size, THP, cpufreq, the kernel command line, the bootloader), because under
emulation every module call costs seconds. It only reads /sys and /proc; it never changes anything.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamahost.host.plugins.module_utils.cpu_lists import parse_cpu_list

DOCUMENTATION = r"""
module: host_topology
short_description: Read CPU/NUMA topology, hugepages, THP, SMT, cpufreq and boot settings
description:
  - Reads C(/sys) and C(/proc) only; supports check mode (it changes nothing either way).
options: {}
author: llamahost
"""

RETURN = r"""
topology:
  description: Online/present CPUs, physical cores and SMT siblings, NUMA nodes with memory and
    hugepages, THP modes, SMT control, cpufreq governors and EPP, kernel command line, NUMA sysctls,
    hugetlbfs mounts, the CPUs PID 1 and the housekeeping cgroups may run on, GRUB presence.
  returned: always
  type: dict
"""

SYS_CPU = "/sys/devices/system/cpu"
SYS_NODE = "/sys/devices/system/node"
THP = "/sys/kernel/mm/transparent_hugepage"
# ISA flags that decide whether a binary runs (x86-64-v3) and whether 1 GiB pages exist (pdpe1gb).
INTERESTING_FLAGS = ("pdpe1gb", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f")


def read(path, default=None):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return default


def read_int(path, default=None):
    text = read(path)
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def cpu_ids(text):
    """A CPU list read from /sys or /proc as a sorted list of ids (empty when the file is missing)."""
    return list(parse_cpu_list(text or ""))


def selected(text):
    """``always [madvise] never`` -> ``madvise`` (sysfs choice files mark the active value)."""
    match = re.search(r"\[([^\]]+)\]", text or "")
    return match.group(1) if match else text


def node_of(cpu):
    links = glob.glob(f"{SYS_CPU}/cpu{cpu}/node[0-9]*")
    return int(os.path.basename(links[0])[4:]) if links else 0


def read_cpus(online):
    cpus = []
    for cpu in online:
        base = f"{SYS_CPU}/cpu{cpu}/topology"
        siblings = read(f"{base}/core_cpus_list") or read(f"{base}/thread_siblings_list") or str(cpu)
        cpus.append({
            "id": cpu,
            "node": node_of(cpu),
            "socket": read_int(f"{base}/physical_package_id", 0),
            "siblings": cpu_ids(siblings),
        })
    return cpus


def read_hugepages(base):
    pages = {}
    for directory in sorted(glob.glob(f"{base}/hugepages/hugepages-*kB")):
        size_kib = int(re.search(r"hugepages-(\d+)kB", directory).group(1))
        pages[str(size_kib)] = {
            "total": read_int(f"{directory}/nr_hugepages", 0),
            "free": read_int(f"{directory}/free_hugepages", 0),
            "surplus": read_int(f"{directory}/surplus_hugepages", 0),
        }
    return pages


def node_memory_kib(node):
    for line in (read(f"{SYS_NODE}/node{node}/meminfo", "") or "").splitlines():
        if "MemTotal:" in line:
            return int(line.split()[-2])
    return 0


def read_nodes(present):
    node_ids = cpu_ids(read(f"{SYS_NODE}/online", "0"))
    nodes = []
    for node in node_ids:
        base = f"{SYS_NODE}/node{node}"
        nodes.append({
            "id": node,
            "cpus": cpu_ids(read(f"{base}/cpulist", "")),
            "present_cpus": [cpu for cpu in present if node_of(cpu) == node],
            "memory_total_kib": node_memory_kib(node),
            "distances": [int(d) for d in (read(f"{base}/distance", "") or "").split()],
            "hugepages": read_hugepages(base),
        })
    return nodes


def read_cpufreq(online):
    governors, preferences = {}, {}
    available_governors, available_preferences = set(), set()
    for cpu in online:
        base = f"{SYS_CPU}/cpu{cpu}/cpufreq"
        governor = read(f"{base}/scaling_governor")
        if governor:
            governors[governor] = governors.get(governor, 0) + 1
            available_governors.update((read(f"{base}/scaling_available_governors", "") or "").split())
        preference = read(f"{base}/energy_performance_preference")
        if preference:
            preferences[preference] = preferences.get(preference, 0) + 1
            available_preferences.update(
                (read(f"{base}/energy_performance_available_preferences", "") or "").split())
    return {
        "governors": governors,
        "available_governors": sorted(available_governors),
        "energy_performance_preferences": preferences,
        "available_energy_performance_preferences": sorted(available_preferences),
    }


def cpu_flags():
    for line in (read("/proc/cpuinfo", "") or "").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return sorted(flag for flag in INTERESTING_FLAGS if flag in flags)
    return []


def hugetlbfs_mounts():
    mounts = []
    for line in (read("/proc/mounts", "") or "").splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "hugetlbfs":
            mounts.append({"path": fields[1], "options": fields[3].split(",")})
    return mounts


def pid1_cpus():
    for line in (read("/proc/1/status", "") or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return cpu_ids(line.split(":", 1)[1])
    return []


def cgroup_cpus():
    """Effective CPUs of the cgroups the cpu role confines (cgroup v2; empty where not mounted)."""
    out = {}
    for unit in ("init.scope", "system.slice", "user.slice"):
        text = read(f"/sys/fs/cgroup/{unit}/cpuset.cpus.effective")
        out[unit] = cpu_ids(text)
    return out


def topology():
    present = cpu_ids(read(f"{SYS_CPU}/present", "0"))
    online = cpu_ids(read(f"{SYS_CPU}/online", "0"))
    cpus = read_cpus(online)
    cores = sorted({tuple(cpu["siblings"]) for cpu in cpus})
    meminfo = read("/proc/meminfo", "") or ""
    total = re.search(r"MemTotal:\s+(\d+)", meminfo)
    return {
        "present_cpus": present,
        "online_cpus": online,
        "cpus": cpus,
        "cores": [list(core) for core in cores],
        "physical_cores": len(cores),
        "threads_per_core": max((len(core) for core in cores), default=1),
        "sockets": len({cpu["socket"] for cpu in cpus}),
        "nodes": read_nodes(present),
        "memory_total_kib": int(total.group(1)) if total else 0,
        "hugepage_sizes_kib": sorted(int(p.split("-")[1][:-2]) for p in glob.glob("/sys/kernel/mm/hugepages/*")),
        "smt": {"control": read(f"{SYS_CPU}/smt/control"), "active": read_int(f"{SYS_CPU}/smt/active")},
        "thp": {"enabled": selected(read(f"{THP}/enabled")), "defrag": selected(read(f"{THP}/defrag"))},
        "cpufreq": read_cpufreq(online),
        "cpu_flags": cpu_flags(),
        "kernel_cmdline": read("/proc/cmdline", ""),
        "sysctl": {
            "kernel.numa_balancing": read_int("/proc/sys/kernel/numa_balancing"),
            "vm.zone_reclaim_mode": read_int("/proc/sys/vm/zone_reclaim_mode"),
        },
        "hugetlbfs_mounts": hugetlbfs_mounts(),
        "pid1_cpus": pid1_cpus(),
        "cgroup_cpus": cgroup_cpus(),
        "grub": {
            "defaults_file": os.path.isfile("/etc/default/grub"),
            "update_grub": shutil.which("update-grub") or shutil.which("update-grub2") or "",
        },
    }


def main():
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    module.exit_json(changed=False, topology=topology())


if __name__ == "__main__":
    main()
