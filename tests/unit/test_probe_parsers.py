"""The host probe's parsers on every fixture tree: recorded (this machine) and generated (documented hosts).

Expected values come from each machine's description (tests/fixtures/hosts/README.md), not from running
the parser: a regression in grouping, numbering or fallback shows up as a wrong count.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
from pathlib import Path

import pytest

from tuner.host_sysfs import HostFiles, parse_cache_size, parse_cpuinfo_blocks, parse_meminfo
from tuner.probe import HostProbe, read_host, select_cpus
from tuner.probe.cpuinfo import identify_cpu, isa_warnings
from tuner.probe.kernel import active_choice, has_capability, parse_memlock_limit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"
EPYC, XEON, GRAVITON, THIS_VM = "epyc-9654-2s-nps4", "xeon-8480-1s", "graviton3-64c", "epyc-kvm-2vcpu"
ALL_FIXTURES = (EPYC, XEON, GRAVITON, THIS_VM)
GIB = 1024**3


@pytest.fixture(scope="module")
def probes() -> dict[str, HostProbe]:
    return {name: read_host(FIXTURES / name) for name in ALL_FIXTURES}


def copy_fixture(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


class HidingFiles(HostFiles):
    """A fixture tree with some paths hidden, as a container or an old kernel hides them.

    Copying the 8,000-file EPYC tree to delete a few hundred files costs seconds; hiding them in the
    reader every parser goes through gives the parsers the same view for free.
    """

    def __init__(self, root: Path, *hidden: str) -> None:
        super().__init__(root)
        self.hidden = hidden

    def _hides(self, host_path: str) -> bool:
        return any(fnmatch.fnmatch(host_path, pattern) for pattern in self.hidden)

    def text(self, host_path: str) -> str | None:
        return None if self._hides(host_path) else super().text(host_path)

    def listdir(self, host_path: str) -> tuple[str, ...]:
        if self._hides(host_path):
            return ()
        return tuple(n for n in super().listdir(host_path) if not self._hides(f"{host_path}/{n}"))


def read_hiding(name: str, *hidden: str) -> HostProbe:
    return read_host(files=HidingFiles(FIXTURES / name, *hidden))


# --- shape of every fixture -------------------------------------------------------------------------

SHAPES = {
    #         sockets nodes cores threads/core llc logical
    EPYC: (2, 8, 192, 2, 24, 384),
    XEON: (1, 1, 56, 2, 1, 112),
    GRAVITON: (1, 1, 64, 1, 1, 64),
    THIS_VM: (1, 1, 2, 1, 1, 2),
}


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_topology_counts(probes: dict[str, HostProbe], name: str) -> None:
    topo = probes[name].topology
    shape = (len(topo.sockets), len(topo.nodes), topo.physical_core_count, topo.threads_per_core,
             len(topo.llc_domains), len(topo.cpus))
    assert shape == SHAPES[name]
    # every logical CPU is in exactly one node, and node CPU lists agree with Cpu.node
    listed = [cpu for node in topo.nodes for cpu in node.cpus]
    assert sorted(listed) == sorted(topo.logical_cpus)
    for node in topo.nodes:
        assert all(topo.cpu(c).node == node.id for c in node.cpus)


def test_epyc_nps4_layout(probes: dict[str, HostProbe]) -> None:
    topo = probes[EPYC].topology
    for node in range(8):
        first = 24 * node
        expected = (*range(first, first + 24), *range(192 + first, 192 + first + 24))
        assert topo.nodes[node].cpus == expected
    assert topo.nodes[0].distances == (10, 12, 12, 12, 32, 32, 32, 32)
    assert topo.nodes[5].distances == (32, 32, 32, 32, 12, 10, 12, 12)
    # SMT siblings n and n+192 share a host-wide core index; socket 1 starts at CPU 96
    assert topo.cores()[topo.cpu(5).core] == (5, 197)
    assert topo.cpu(95).socket == 0 and topo.cpu(96).socket == 1 and topo.cpu(288).socket == 1
    assert len({topo.cpu(c).core for c in range(192)}) == 192
    # one CCX = 8 cores and their siblings share an LLC domain; the next 8 cores are the next domain
    assert topo.cpu(0).llc == topo.cpu(7).llc == topo.cpu(192).llc != topo.cpu(8).llc
    assert topo.cpu(96).llc == 12
    assert set(topo.llc_size_bytes.values()) == {32 * 1024**2}
    assert topo.nodes[3].hugepages_total == {2048: 1024, 1048576: 4}
    assert topo.nodes[3].hugepages_free == {2048: 1000, 1048576: 4}
    # 24 x 64 GiB, less what firmware and kernel keep (3 GiB on node 0, 0.5 GiB elsewhere)
    assert sum(n.memory_total_bytes for n in topo.nodes) == (8 * 192 - 3 - 7 * 0.5) * GIB


def test_xeon_siblings_are_n_and_n_plus_56(probes: dict[str, HostProbe]) -> None:
    topo = probes[XEON].topology
    assert all(topo.cores()[topo.cpu(n).core] == (n, n + 56) for n in range(56))
    assert topo.nodes[0].cpus == tuple(range(112))
    assert topo.llc_size_bytes == {0: 105 * 1024**2}


KERNEL = {
    # thp, defrag, numa_balancing, smt, governors, epp, host hugepages, memlock, can lock
    EPYC: ("always", "madvise", 1, "on", {"performance": 384}, {}, {2048: 8192, 1048576: 32}, None, True),
    XEON: ("madvise", "madvise", 0, "on", {"powersave": 112}, {"balance_performance": 112},
           {2048: 0, 1048576: 0}, 8 * 1024**2, False),
    GRAVITON: ("madvise", "never", 0, "notsupported", {}, {}, {64: 0, 2048: 512, 32768: 0, 1048576: 0},
               8 * 1024**2, True),
    THIS_VM: ("madvise", "madvise", 0, "notsupported", {}, {}, {2048: 0, 1048576: 0}, 8 * 1024**2, True),
}


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_kernel_settings(probes: dict[str, HostProbe], name: str) -> None:
    k = probes[name].kernel
    got = (k.thp_enabled, k.thp_defrag, k.numa_balancing, k.smt_control, k.governors,
           k.energy_performance_preference, k.hugepages_total, k.memlock_limit_bytes, k.can_lock_memory)
    assert got == KERNEL[name]
    assert k.zone_reclaim_mode == 0 and k.memlock_limit_known


IDENTITY = {
    EPYC: ("x86_64", "AuthenticAMD", "AMD EPYC 9654 96-Core Processor",
           ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni",
            "avx512_bf16")),
    XEON: ("x86_64", "GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+",
           ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni",
            "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")),
    GRAVITON: ("aarch64", "ARM", "Neoverse-V1", ("asimd", "asimddp", "asimdhp", "i8mm", "sve", "bf16")),
    THIS_VM: ("x86_64", "AuthenticAMD", "AMD EPYC", ("avx", "avx2", "fma", "f16c")),
}


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_cpu_identity_and_memory(probes: dict[str, HostProbe], name: str) -> None:
    probe = probes[name]
    assert (probe.architecture, probe.cpu_vendor, probe.cpu_model, probe.isa) == IDENTITY[name]
    assert 0 < probe.memory_available_bytes <= probe.memory_total_bytes
    assert probe.allowed_cpus == probe.topology.logical_cpus


def test_generated_trees_have_no_warnings_and_this_vm_flags_its_ballooned_node(
        probes: dict[str, HostProbe]) -> None:
    assert probes[EPYC].warnings == probes[XEON].warnings == probes[GRAVITON].warnings == ()
    # recorded: this guest's node0 meminfo covers only part of MemTotal (memory hot-plugged by the VMM)
    assert any("NUMA node memory adds up to" in w for w in probes[THIS_VM].warnings)


# --- fallbacks and missing files --------------------------------------------------------------------

def test_kernel_without_numa_is_one_node_with_proc_meminfo() -> None:
    probe = read_hiding(EPYC, "/sys/devices/system/node*")
    (node,) = probe.topology.nodes
    assert node.id == 0 and node.cpus == tuple(range(384)) and node.distances == (10,)
    assert node.memory_total_bytes == probe.memory_total_bytes
    assert node.hugepages_total == {2048: 8192, 1048576: 32}  # host-wide counts
    assert {c.node for c in probe.topology.cpus} == {0}
    assert probe.topology.physical_core_count == 192  # the rest of the topology is unaffected


def test_core_id_fallback_when_sibling_lists_are_hidden() -> None:
    topo = read_hiding(EPYC, "/sys/devices/system/cpu/cpu*/topology/core_cpus_list").topology
    assert topo.physical_core_count == 192 and topo.cores()[topo.cpu(100).core] == (100, 292)


def test_cpuinfo_fallback_when_sysfs_cpu_topology_is_hidden() -> None:
    probe = read_hiding(XEON, "/sys/devices/system/cpu*")
    topo = probe.topology
    assert len(topo.cpus) == 112 and topo.physical_core_count == 56 and topo.threads_per_core == 2
    assert len(topo.llc_domains) == 1  # one socket taken as the LLC domain
    assert any("cache topology is hidden" in w for w in probe.warnings)


def test_empty_root_gives_a_probe_not_a_crash(tmp_path: Path) -> None:
    probe = read_host(tmp_path)
    assert probe.architecture == "unknown" and probe.isa == ()
    assert len(probe.topology.cpus) == 1 and probe.memory_total_bytes == 0
    assert probe.kernel.thp_enabled is None and probe.kernel.numa_balancing is None
    assert not probe.kernel.memlock_limit_known and not probe.kernel.can_lock_memory
    assert len(probe.warnings) >= 3
    assert isinstance(probe.fingerprint(), str)


@pytest.mark.parametrize("missing", sorted(
    str(p.relative_to(FIXTURES / THIS_VM)) for p in (FIXTURES / THIS_VM).rglob("*") if p.is_file()))
def test_any_single_missing_file_is_tolerated(tmp_path: Path, missing: str) -> None:
    root = copy_fixture(THIS_VM, tmp_path)
    (root / missing).unlink()
    probe = read_host(root)
    assert len(probe.topology.cpus) == 2
    json.dumps(probe.to_dict())


def test_memory_only_node_is_kept_but_runs_no_threads(tmp_path: Path) -> None:
    root = copy_fixture(THIS_VM, tmp_path)
    node1 = root / "sys/devices/system/node/node1"
    node1.mkdir()
    (node1 / "cpulist").write_text("\n")
    (node1 / "meminfo").write_text("Node 1 MemTotal:  16777216 kB\nNode 1 MemFree:  16000000 kB\n")
    (node1 / "distance").write_text("20 10\n")
    (root / "sys/devices/system/node/online").write_text("0-1\n")
    probe = read_host(root)
    topo = probe.topology
    assert topo.node_ids == (0, 1) and topo.nodes[1].cpus == () and topo.nodes_with_cpus == (0,)
    assert topo.nodes[1].memory_total_bytes == 16 * GIB
    assert select_cpus(topo, 2, smt=False, placement="scatter") == (0, 1)


def test_garbage_content_is_treated_as_missing(tmp_path: Path) -> None:
    root = copy_fixture(THIS_VM, tmp_path)
    for rel in ("sys/devices/system/cpu/online", "sys/devices/system/node/node0/cpulist",
                "proc/sys/kernel/numa_balancing", "sys/devices/system/cpu/cpu0/topology/core_cpus_list"):
        (root / rel).write_text("\xff not a number-\n")
    (root / "sys/devices/system/cpu/cpu1/cache/index3/size").write_bytes(b"\xff\xfe")
    probe = read_host(root)
    assert probe.topology.logical_cpus == (0, 1)
    assert probe.kernel.numa_balancing is None


# --- small pure helpers -----------------------------------------------------------------------------

def test_small_parsers() -> None:
    assert active_choice("always defer defer+madvise [madvise] never") == "madvise"
    assert active_choice("[always] madvise never") == "always"
    assert parse_cache_size("32768K") == 32 * 1024**2 and parse_cache_size("2M") == 2 * 1024**2
    assert parse_cache_size("big") is None
    assert parse_memlock_limit("Max locked memory  unlimited  unlimited  bytes") == (True, None)
    assert parse_memlock_limit("Max locked memory  65536  65536  bytes") == (True, 65536)
    assert parse_memlock_limit("") == (False, None)
    assert has_capability("CapEff:\t0000000000004000\n", 14)
    assert not has_capability("CapEff:\t0000000000003fff\n", 14)
    assert parse_meminfo("Node 3 MemTotal:  100 kB\nNode 3 HugePages_Total:   7\n") == {
        "MemTotal": 102400, "HugePages_Total": 7}


def test_arm_without_model_name_is_named_from_midr_and_flags_unsupported_isa() -> None:
    blocks = parse_cpuinfo_blocks("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
                                  "CPU part\t: 0xd0c\n")
    identity = identify_cpu(blocks)
    assert (identity.vendor, identity.model, identity.isa) == ("ARM", "Neoverse-N1", ("asimd",))
    assert isa_warnings(identity) and "asimddp" in isa_warnings(identity)[0]


def test_host_files_reads_under_root(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/x").write_text(" 42 \n")
    files = HostFiles(tmp_path)
    assert files.text("/proc/x") == "42" and files.integer("/proc/x") == 42
    assert files.text("/proc/missing") is None and files.listdir("/nope") == ()
    assert not files.is_live and HostFiles("/").is_live


# --- fingerprint and serialisation ------------------------------------------------------------------

def test_fingerprint_definition_is_stable() -> None:
    # Studies and results are keyed by these values: changing the definition orphans every stored study.
    assert read_host(FIXTURES / XEON).fingerprint() == "502ba5c9b54c8177"
    assert read_host(FIXTURES / EPYC).fingerprint() == "9ce7dd1d9ae998ef"


def test_fingerprint_is_the_same_for_two_probes_of_this_machine() -> None:
    assert read_host("/").fingerprint() == read_host("/").fingerprint()


def test_fingerprint_separates_hosts_and_ignores_run_to_run_state(probes: dict[str, HostProbe]) -> None:
    assert len({p.fingerprint() for p in probes.values()}) == len(probes)
    base = probes[XEON]
    same = dataclasses.replace(base, hostname="other", memory_available_bytes=1, warnings=("x",),
                               kernel=probes[EPYC].kernel, kernel_release="7.0")
    assert same.fingerprint() == base.fingerprint()
    fewer_cpus = dataclasses.replace(base.topology, cpus=base.topology.cpus[:-1])
    for changed in (dataclasses.replace(base, isa=base.isa[:-1]),
                    dataclasses.replace(base, memory_total_bytes=base.memory_total_bytes + 2 * GIB),
                    dataclasses.replace(base, cpu_model="Intel(R) Xeon(R) Platinum 8470"),
                    dataclasses.replace(base, topology=fewer_cpus)):
        assert changed.fingerprint() != base.fingerprint()


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_to_dict_round_trips_through_json(probes: dict[str, HostProbe], name: str) -> None:
    probe = probes[name]
    restored = HostProbe.from_dict(json.loads(json.dumps(probe.to_dict())))
    assert restored == probe
    assert restored.fingerprint() == probe.fingerprint()
