#!/usr/bin/python3
"""Ansible module: read a Linux host's CPU/NUMA topology and the kernel settings the roles manage.

One call returns everything the roles validate against (nodes, cores, SMT siblings, memory per node,
hugepages per node and size, THP, cpufreq, the kernel command line, the bootloader, the distribution),
because under emulation every module call costs seconds. It only reads /sys, /proc and /etc/os-release; it
never changes anything. CPUs, cores, sockets and NUMA nodes come from ``module_utils/host_sysfs``, the reader
the tuner's probe uses too (``tuner/host_sysfs.py`` links to it), so the role and the tuner agree on which
CPUs are SMT siblings and which node each sits on, hidden sysfs files and all.

With ``require_supported_os`` (every role's validation sets it) it also refuses a distribution the roles
cannot prepare, naming it, before any role has changed anything: the roles install with apt and set kernel
arguments through /etc/default/grub and update-grub, which RHEL-family hosts (dnf, grubby, tuned) do not have.
"""

from __future__ import annotations

import os
import re
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamahost.host.plugins.module_utils.host_sysfs import (
    CPU_DIR,
    HOST_HUGEPAGES_DIR,
    KIB,
    HostFiles,
    cpuinfo_topology,
    hugepages_in,
    numbered_entries,
    parse_cpuinfo_blocks,
    parse_meminfo,
    read_topology,
    tolerant_cpu_list,
)
from ansible_collections.llamahost.host.plugins.module_utils.llama_cpu_features import FAST_FEATURES

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

THP = "/sys/kernel/mm/transparent_hugepage"
# ISA flags that decide whether a binary runs (x86-64-v3) and whether 1 GiB pages exist (pdpe1gb), and the fast
# ones llama.cpp has kernels for (x86 and arm64), which verify reports when the serving build leaves them unused.
INTERESTING_FLAGS = tuple(dict.fromkeys(("pdpe1gb", "avx", "avx2", "fma", "f16c", "bmi2")
                                        + tuple(flag for flag, _ in FAST_FEATURES)))
OS_RELEASE = "/etc/os-release"
FILES = HostFiles("/")
# os-release IDs (ID or ID_LIKE) -> the family whose package manager and boot tooling the roles would use.
OS_FAMILIES = {"debian": "debian", "ubuntu": "debian", "rhel": "redhat", "fedora": "redhat", "centos": "redhat",
               "rocky": "redhat", "almalinux": "redhat", "suse": "suse", "arch": "arch", "alpine": "alpine"}
SUPPORTED_FAMILIES = ("debian",)


def read(path, default=None):
    text = FILES.text(path)
    return default if text is None else text


def read_int(path, default=None):
    value = FILES.integer(path)
    return default if value is None else value


def cpu_ids(text):
    """A CPU list read from /sys or /proc as a sorted list of ids (empty when missing or malformed)."""
    return list(tolerant_cpu_list(text) or ())


def selected(text):
    """``always [madvise] never`` -> ``madvise`` (sysfs choice files mark the active value)."""
    match = re.search(r"\[([^\]]+)\]", text or "")
    return match.group(1) if match else text


def node_of(cpu):
    """The node of a present CPU, online or not (its ``cpuN/nodeM`` link); 0 on a kernel without NUMA."""
    links = numbered_entries(FILES, f"{CPU_DIR}/cpu{cpu}", "node")
    return links[0] if links else 0


def cpu_entries(found):
    """The online CPUs as the roles read them: SMT siblings are the CPUs of the same physical core."""
    cores = found.cores()
    return [{"id": cpu.id, "node": cpu.node, "socket": cpu.socket, "siblings": list(cores[cpu.core])}
            for cpu in found.cpus]


def node_entries(found, present):
    """The NUMA nodes as the roles read them; ``present_cpus`` adds the offline CPUs (SMT siblings switched
    off), which the tuner's topology leaves out because they cannot run anything now."""
    node_of_present = {cpu: node_of(cpu) for cpu in present}  # one directory listing per CPU, not per node
    return [{
        "id": node.id,
        "cpus": list(node.cpus),
        "present_cpus": [cpu for cpu in present if node_of_present[cpu] == node.id],
        "memory_total_kib": node.memory_total_bytes // KIB,
        "distances": list(node.distances),
        "hugepages": {str(size): {"total": node.hugepages_total.get(size, 0),
                                  "free": node.hugepages_free.get(size, 0)}
                      for size in sorted(set(node.hugepages_total) | set(node.hugepages_free))},
    } for node in found.nodes]


def read_cpufreq(online):
    governors, preferences = {}, {}
    available_governors, available_preferences = set(), set()
    for cpu in online:
        base = f"{CPU_DIR}/cpu{cpu}/cpufreq"
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


def cpu_flags(blocks):
    """The interesting flags of the first processor: x86's ``flags``, arm64's ``Features``."""
    first = blocks[0] if blocks else {}
    flags = set((first.get("flags") or first.get("Features") or "").split())
    return sorted(flag for flag in INTERESTING_FLAGS if flag in flags)


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
    present = cpu_ids(read(f"{CPU_DIR}/present", "0"))
    blocks = parse_cpuinfo_blocks(read("/proc/cpuinfo", ""))
    meminfo = parse_meminfo(read("/proc/meminfo", ""))
    # The tuner's probe reads the same way (tuner.host_sysfs is this module_utils file).
    found = read_topology(FILES, meminfo_total_bytes=meminfo.get("MemTotal"),
                          meminfo_free_bytes=meminfo.get("MemFree"), cpuinfo=cpuinfo_topology(blocks))
    cores = list(found.cores().values())
    return {
        "present_cpus": present,
        "online_cpus": list(found.logical_cpus),
        "cpus": cpu_entries(found),
        "cores": [list(core) for core in cores],
        "physical_cores": found.physical_core_count,
        "threads_per_core": found.threads_per_core,
        "sockets": len(found.sockets),
        "nodes": node_entries(found, present),
        "memory_total_kib": meminfo.get("MemTotal", 0) // KIB,
        "hugepage_sizes_kib": sorted(hugepages_in(FILES, HOST_HUGEPAGES_DIR)[0]),
        "smt": {"control": read(f"{CPU_DIR}/smt/control"), "active": read_int(f"{CPU_DIR}/smt/active")},
        "thp": {"enabled": selected(read(f"{THP}/enabled")), "defrag": selected(read(f"{THP}/defrag"))},
        "cpufreq": read_cpufreq(found.logical_cpus),
        "cpu_flags": cpu_flags(blocks),
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
