#!/usr/bin/python3
"""Ansible module: read a Linux host's CPU/NUMA topology and the kernel settings the roles manage.

One call returns everything the roles validate against (nodes, cores, SMT siblings, memory per node,
hugepages per node and size, THP, cpufreq, the kernel command line, the bootloader, the distribution),
because under emulation every module call costs seconds. It only reads /sys, /proc and /etc/os-release; it
never changes anything.

With ``require_supported_os`` (every role's validation sets it) it also refuses a distribution the roles
cannot prepare, naming it, before any role has changed anything: the roles install with apt and set kernel
arguments through /etc/default/grub and update-grub, which RHEL-family hosts (dnf, grubby, tuned) do not have.
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
options:
  require_supported_os:
    description: Fail, naming the distribution, unless it is one the roles support (the Debian family).
    type: bool
    default: false
author: llamahost
"""

RETURN = r"""
topology:
  description: Online/present CPUs, physical cores and SMT siblings, NUMA nodes with memory and
    hugepages, THP modes, SMT control, cpufreq governors and EPP, kernel command line, NUMA sysctls,
    hugetlbfs mounts, the CPUs PID 1 and the housekeeping cgroups may run on, GRUB presence, and the
    distribution (os: id, id_like, version_id, name, family) from /etc/os-release.
  returned: always
  type: dict
"""

SYS_CPU = "/sys/devices/system/cpu"
SYS_NODE = "/sys/devices/system/node"
THP = "/sys/kernel/mm/transparent_hugepage"
# ISA flags that decide whether a binary runs (x86-64-v3) and whether 1 GiB pages exist (pdpe1gb).
INTERESTING_FLAGS = ("pdpe1gb", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f")
OS_RELEASE = "/etc/os-release"
# os-release IDs (ID or ID_LIKE) -> the family whose package manager and boot tooling the roles would use.
OS_FAMILIES = {"debian": "debian", "ubuntu": "debian", "rhel": "redhat", "fedora": "redhat", "centos": "redhat",
               "rocky": "redhat", "almalinux": "redhat", "suse": "suse", "arch": "arch", "alpine": "alpine"}
SUPPORTED_FAMILIES = ("debian",)


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


def parse_os_release(text):
    """The fields of an os-release file (``KEY=value``, values optionally quoted) that name a distribution."""
    fields = {}
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            fields[key] = value
    ids = [fields.get("ID", "").lower(), *fields.get("ID_LIKE", "").lower().split()]
    family = next((OS_FAMILIES[i] for i in ids if i in OS_FAMILIES), "unknown")
    return {"id": ids[0], "id_like": ids[1:], "version_id": fields.get("VERSION_ID", ""),
            "name": fields.get("PRETTY_NAME") or fields.get("NAME") or ids[0] or "an unnamed distribution",
            "family": family}


def os_problem(os_info):
    """Why the roles cannot prepare this distribution, or None when they can."""
    if os_info["family"] in SUPPORTED_FAMILIES:
        return None
    found = f"{os_info['name']} (ID {os_info['id'] or 'missing'}, family {os_info['family']})"
    return (f"this host runs {found}, which the llamahost.host roles do not support yet: they install with apt "
            "and set kernel arguments through /etc/default/grub and update-grub (a RHEL-family host has dnf, "
            "grubby and tuned instead). Nothing was changed. Prepare a Debian 12 or Ubuntu 22.04/24.04 host, "
            f"or remove this host from the llama_hosts group")


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
        "os": parse_os_release(read(OS_RELEASE, "")),
    }


def main():
    module = AnsibleModule(argument_spec={"require_supported_os": {"type": "bool", "default": False}},
                           supports_check_mode=True)
    found = topology()
    problem = os_problem(found["os"]) if module.params["require_supported_os"] else None
    if problem:
        module.fail_json(msg=problem, topology=found)
    module.exit_json(changed=False, topology=found)


if __name__ == "__main__":
    main()
