"""A Linux host's CPU and NUMA topology from /sys and /proc: the one reader for the tuner and the collection.

The tuner's probe (as ``tuner.host_sysfs``, a link to this file) and the ``host_topology`` module, which the
roles validate against, read cores, SMT siblings, sockets, last-level caches and NUMA nodes with the same
functions, so the CPUs the tuner pins a trial to are the CPUs the role's unit serves on. It runs on the
managed host (Ansible ships module_utils with a module), so it keeps to the standard library and to Python
3.8 at run time.

Sources, in the order they are trusted:

* ``/sys/devices/system/cpu/online``: the CPUs to describe (offline CPUs cannot run anything);
* ``cpuN/topology/``: ``physical_package_id`` is the socket; ``core_cpus_list`` (older kernels:
  ``thread_siblings_list``) is the set of SMT siblings of one physical core. The core index is made
  host-wide unique by numbering sibling sets in order of their lowest CPU, so it does not depend on
  ``core_id``, which is only unique within a package and is not contiguous on many EPYC parts.
  When neither list exists, (package, ``core_id``) identifies the core; failing that, /proc/cpuinfo's
  ``physical id``/``core id``; failing that, every CPU is its own core;
* ``cpuN/cache/indexM/``: the last-level cache is the highest-level Unified (or Data) cache; CPUs that
  list the same ``shared_cpu_list`` share it. On EPYC that is one CCX, on most Xeons the whole socket;
* ``/sys/devices/system/node/``: NUMA nodes with their CPUs, memory, hugepages and distances. A kernel
  built without NUMA has no such directory: then the host is one node 0 holding every CPU and the
  memory of /proc/meminfo.

Every file is read through :class:`HostFiles`, rooted at ``/`` on a host and at a recorded tree in tests.
Containers and VMs hide many of these files, and sysfs answers some reads with EINVAL or ENODEV: a file that
cannot be read is ``None`` (or an empty listing), a fact about the host, not a crash. Everything here is pure
reading plus grouping; nothing is cached or measured.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .cpu_lists import CpuListError, parse_cpu_list

CPU_DIR = "/sys/devices/system/cpu"
NODE_DIR = "/sys/devices/system/node"
HOST_HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"
KIB = 1024
_HUGEPAGE_DIR = re.compile(r"^hugepages-(\d+)kB$")
_NUMBERED = re.compile(r"^(cpu|node|index)(\d+)$")
_SIZE = re.compile(r"^(\d+)\s*([KMG]?)$", re.IGNORECASE)


def tolerant_cpu_list(text: str | None) -> tuple[int, ...] | None:
    """A kernel CPU list (``0-3,8``) read from the host: ``None`` when absent or malformed, never an error."""
    if text is None:
        return None
    try:
        return parse_cpu_list(text)
    except CpuListError:
        return None


class HostFiles:
    """The files of one host as seen from ``root`` (``/`` for the machine this runs on)."""

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)

    @property
    def is_live(self) -> bool:
        """Whether this is the running machine (so measuring and process state apply to it)."""
        return self.root.resolve() == Path("/")

    def path(self, host_path: str) -> Path:
        """``/sys/devices/...`` on the host -> the same file under :attr:`root`."""
        return self.root / host_path.lstrip("/")

    def text(self, host_path: str) -> str | None:
        """The file's content without surrounding whitespace, or ``None`` if it cannot be read."""
        try:
            return self.path(host_path).read_text(encoding="utf-8", errors="strict").strip()
        except (OSError, UnicodeDecodeError):
            return None

    def integer(self, host_path: str) -> int | None:
        """The file as one integer, or ``None`` if missing or not a number."""
        raw = self.text(host_path)
        if raw is None:
            return None
        try:
            return int(raw.split()[0]) if raw else None
        except ValueError:
            return None

    def cpu_list(self, host_path: str) -> tuple[int, ...] | None:
        """A kernel CPU/node list file (``0-3,8``), or ``None`` if missing or malformed."""
        return tolerant_cpu_list(self.text(host_path))

    def listdir(self, host_path: str) -> tuple[str, ...]:
        """Sorted entry names of a directory; empty when it is missing."""
        try:
            return tuple(sorted(entry.name for entry in self.path(host_path).iterdir()))
        except OSError:
            return ()


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
    # last-level-cache domain (Cpu.llc) -> its size in bytes, where sysfs tells it
    llc_size_bytes: dict[int, int] = field(default_factory=dict)

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

    @property
    def nodes_with_cpus(self) -> tuple[int, ...]:
        """Nodes that can run threads (memory-only nodes, e.g. CXL or HBM, are left out)."""
        return tuple(n.id for n in self.nodes if n.cpus)

    def restricted_to(self, cpu_ids: Iterable[int]) -> Topology:
        """This topology as a process confined to ``cpu_ids`` sees it (its affinity, its cgroup cpuset): only
        those CPUs, each node keeping its memory. A core with a sibling outside the set has one thread left."""
        keep = set(cpu_ids)
        return Topology(
            cpus=tuple(c for c in self.cpus if c.id in keep),
            nodes=tuple(replace(node, cpus=tuple(c for c in node.cpus if c in keep)) for node in self.nodes),
            llc_size_bytes=dict(self.llc_size_bytes),
        )

    def primary_cpus(self) -> tuple[int, ...]:
        """The first logical CPU of every physical core: one thread per core, no SMT sibling."""
        return tuple(ids[0] for ids in self.cores().values())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        return cls(
            cpus=tuple(Cpu(**cpu) for cpu in data["cpus"]),
            nodes=tuple(
                NumaNode(
                    id=node["id"],
                    cpus=tuple(node["cpus"]),
                    memory_total_bytes=node["memory_total_bytes"],
                    memory_free_bytes=node["memory_free_bytes"],
                    hugepages_total=int_keys(node.get("hugepages_total", {})),
                    hugepages_free=int_keys(node.get("hugepages_free", {})),
                    distances=tuple(node.get("distances", ())),
                )
                for node in data["nodes"]
            ),
            llc_size_bytes=int_keys(data.get("llc_size_bytes", {})),
        )


def int_keys(mapping: Mapping[Any, int]) -> dict[int, int]:
    return {int(k): int(v) for k, v in mapping.items()}


@dataclass(frozen=True)
class CpuinfoTopology:
    """What /proc/cpuinfo says about one processor, used only when sysfs topology is hidden."""

    socket: int | None
    core_id: int | None


@dataclass(frozen=True)
class CacheDomain:
    """The last-level cache one CPU belongs to, identified by the CPUs that share it."""

    key: tuple[int, ...] | str
    size_bytes: int | None


def numbered_entries(files: HostFiles, directory: str, prefix: str) -> tuple[int, ...]:
    """``cpu0 cpu1 ... cpu17`` in a directory -> ``(0, 1, ..., 17)``, numerically sorted."""
    found = []
    for name in files.listdir(directory):
        match = _NUMBERED.match(name)
        if match and match.group(1) == prefix:
            found.append(int(match.group(2)))
    return tuple(sorted(found))


def online_cpus(files: HostFiles, cpuinfo_ids: Sequence[int] = ()) -> tuple[int, ...]:
    """The online logical CPUs. Falls back to the cpuN directories, then to /proc/cpuinfo's processors."""
    listed = files.cpu_list(f"{CPU_DIR}/online")
    if listed:
        return listed
    present = numbered_entries(files, CPU_DIR, "cpu")
    if present:
        return present
    return tuple(sorted(cpuinfo_ids))


def parse_cache_size(text: str | None) -> int | None:
    """sysfs cache sizes look like ``32768K``; returns bytes."""
    if text is None:
        return None
    match = _SIZE.match(text.strip())
    if not match:
        return None
    scale = {"": 1, "K": KIB, "M": KIB**2, "G": KIB**3}[match.group(2).upper()]
    return int(match.group(1)) * scale


def last_level_cache(files: HostFiles, cpu: int) -> CacheDomain | None:
    """The highest-level unified cache of ``cpu`` (instruction caches never count)."""
    base = f"{CPU_DIR}/cpu{cpu}/cache"
    best: tuple[int, str] | None = None
    for index in numbered_entries(files, base, "index"):
        level = files.integer(f"{base}/index{index}/level")
        if level is None or (best is not None and level <= best[0]):
            continue
        if files.text(f"{base}/index{index}/type") in ("Unified", "Data"):
            best = (level, f"{base}/index{index}")
    if best is None:
        return None
    level, directory = best
    shared = files.cpu_list(f"{directory}/shared_cpu_list")
    size = parse_cache_size(files.text(f"{directory}/size"))
    if shared:
        return CacheDomain(key=shared, size_bytes=size)
    cache_id = files.text(f"{directory}/id")
    if cache_id is not None:
        return CacheDomain(key=f"L{level}#{cache_id}", size_bytes=size)
    return None


def core_siblings(files: HostFiles, cpu: int) -> tuple[int, ...] | None:
    """The logical CPUs of ``cpu``'s physical core, from sysfs (newest file name first)."""
    for name in ("core_cpus_list", "thread_siblings_list"):
        siblings = files.cpu_list(f"{CPU_DIR}/cpu{cpu}/topology/{name}")
        if siblings:
            return siblings
    return None


def _number_by_first_cpu(keys: Mapping[int, object]) -> dict[int, int]:
    """Give each distinct key an index, in order of the lowest CPU that has it: deterministic and dense."""
    order: dict[object, int] = {}
    for cpu in sorted(keys):
        order.setdefault(keys[cpu], len(order))
    return {cpu: order[keys[cpu]] for cpu in keys}


def read_topology(
    files: HostFiles,
    *,
    meminfo_total_bytes: int | None,
    meminfo_free_bytes: int | None,
    cpuinfo: Mapping[int, CpuinfoTopology] | None = None,
    warnings: list[str] | None = None,
) -> Topology:
    """Read the CPU and NUMA topology of the host behind ``files``.

    ``meminfo_*`` come from /proc/meminfo and are used for the single node of a kernel without NUMA.
    ``cpuinfo`` is the per-processor fallback when sysfs topology files are hidden. Problems that make
    the result less precise are appended to ``warnings``.
    """
    notes = warnings if warnings is not None else []
    cpuinfo = cpuinfo or {}
    cpus = online_cpus(files, tuple(cpuinfo))
    if not cpus:
        notes.append("no online CPUs found in /sys or /proc/cpuinfo; assuming one CPU (0)")
        cpus = (0,)

    sockets: dict[int, int] = {}
    core_keys: dict[int, object] = {}
    llc_keys: dict[int, object] = {}
    llc_sizes: dict[object, int] = {}
    guessed_cores = guessed_llc = False
    for cpu in cpus:
        fallback = cpuinfo.get(cpu, CpuinfoTopology(None, None))
        package = files.integer(f"{CPU_DIR}/cpu{cpu}/topology/physical_package_id")
        if package is None:
            package = fallback.socket
        sockets[cpu] = max(package or 0, 0)  # some Arm firmware reports -1: one package
        siblings = core_siblings(files, cpu)
        core_id = files.integer(f"{CPU_DIR}/cpu{cpu}/topology/core_id") if siblings is None else None
        if core_id is None and siblings is None:
            core_id = fallback.core_id
        if siblings is not None:
            core_keys[cpu] = siblings
        elif core_id is not None:
            core_keys[cpu] = ("package-core", sockets[cpu], core_id)
        else:
            core_keys[cpu] = ("cpu", cpu)
            guessed_cores = True
        cache = last_level_cache(files, cpu)
        if cache is None:
            llc_keys[cpu] = ("socket", sockets[cpu])
            guessed_llc = True
        else:
            llc_keys[cpu] = cache.key
            if cache.size_bytes is not None:
                llc_sizes[cache.key] = cache.size_bytes
    if guessed_cores:
        notes.append("CPU core topology is hidden (no topology/core_cpus_list or core_id): "
                      "each logical CPU is counted as its own physical core")
    if guessed_llc:
        notes.append("cache topology is hidden (no cache/index*/shared_cpu_list): "
                      "each socket is taken as one last-level-cache domain")

    cores = _number_by_first_cpu(core_keys)
    llcs = _number_by_first_cpu(llc_keys)
    nodes, node_of = read_numa_nodes(files, cpus, meminfo_total_bytes, meminfo_free_bytes, notes)
    topology_cpus = tuple(
        Cpu(id=cpu, core=cores[cpu], socket=sockets[cpu], node=node_of.get(cpu, nodes[0].id), llc=llcs[cpu])
        for cpu in cpus
    )
    sizes = {llcs[cpu]: llc_sizes[key] for cpu, key in llc_keys.items() if key in llc_sizes}
    return Topology(cpus=topology_cpus, nodes=nodes, llc_size_bytes=dict(sorted(sizes.items())))


def hugepages_in(files: HostFiles, directory: str) -> tuple[dict[int, int], dict[int, int]]:
    """``hugepages-2048kB/{nr,free}_hugepages`` under ``directory`` -> (total, free) by page size in KiB."""
    total: dict[int, int] = {}
    free: dict[int, int] = {}
    for name in files.listdir(directory):
        match = _HUGEPAGE_DIR.match(name)
        if not match:
            continue
        size_kib = int(match.group(1))
        count = files.integer(f"{directory}/{name}/nr_hugepages")
        available = files.integer(f"{directory}/{name}/free_hugepages")
        if count is not None:
            total[size_kib] = count
        if available is not None:
            free[size_kib] = available
    return dict(sorted(total.items())), dict(sorted(free.items()))


def parse_meminfo(text: str | None) -> dict[str, int]:
    """/proc/meminfo or a node's meminfo -> field name to bytes (``Node 0 `` prefixes dropped).

    Fields given in kB are converted to bytes; unit-less fields (HugePages_Total) stay counts.
    """
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        head, sep, rest = line.partition(":")
        if not sep:
            continue
        name = head.split()[-1] if head.startswith("Node ") else head.strip()
        parts = rest.split()
        if not parts:
            continue
        try:
            number = int(parts[0])
        except ValueError:
            continue
        values[name] = number * KIB if len(parts) > 1 and parts[1] == "kB" else number
    return values


def read_numa_nodes(
    files: HostFiles,
    cpus: Sequence[int],
    meminfo_total_bytes: int | None,
    meminfo_free_bytes: int | None,
    warnings: list[str],
) -> tuple[tuple[NumaNode, ...], dict[int, int]]:
    """NUMA nodes and the node of each CPU. Without /sys/devices/system/node: one node 0 with everything."""
    online = set(cpus)
    node_ids = files.cpu_list(f"{NODE_DIR}/online") or numbered_entries(files, NODE_DIR, "node")
    node_ids = tuple(n for n in node_ids if files.text(f"{NODE_DIR}/node{n}/cpulist") is not None)
    if not node_ids:
        total, free = hugepages_in(files, HOST_HUGEPAGES_DIR)
        single = NumaNode(
            id=0,
            cpus=tuple(cpus),
            memory_total_bytes=meminfo_total_bytes or 0,
            memory_free_bytes=meminfo_free_bytes or 0,
            hugepages_total=total,
            hugepages_free=free,
            distances=(10,),
        )
        return (single,), dict.fromkeys(cpus, 0)

    nodes = []
    node_of: dict[int, int] = {}
    for node in node_ids:
        base = f"{NODE_DIR}/node{node}"
        node_cpus = tuple(c for c in files.cpu_list(f"{base}/cpulist") or () if c in online)
        for cpu in node_cpus:
            node_of.setdefault(cpu, node)
        meminfo = parse_meminfo(files.text(f"{base}/meminfo"))
        total, free = hugepages_in(files, f"{base}/hugepages")
        distance_text = files.text(f"{base}/distance") or ""
        distances = tuple(int(d) for d in distance_text.split() if d.isdigit())
        nodes.append(NumaNode(
            id=node,
            cpus=node_cpus,
            memory_total_bytes=meminfo.get("MemTotal", 0),
            memory_free_bytes=meminfo.get("MemFree", 0),
            hugepages_total=total,
            hugepages_free=free,
            distances=distances,
        ))
    orphans = sorted(online - set(node_of))
    if orphans:
        warnings.append(f"CPUs {orphans} belong to no NUMA node in sysfs; counted on node {nodes[0].id}")
    node_memory = sum(n.memory_total_bytes for n in nodes)
    if meminfo_total_bytes and abs(node_memory - meminfo_total_bytes) > 0.05 * meminfo_total_bytes:
        warnings.append(
            f"NUMA node memory adds up to {node_memory / KIB**3:.1f} GiB but /proc/meminfo MemTotal is "
            f"{meminfo_total_bytes / KIB**3:.1f} GiB (memory hot-plugged or ballooned by a hypervisor?): "
            "per-node memory figures are unreliable on this host"
        )
    return tuple(nodes), node_of


def parse_cpuinfo_blocks(text: str | None) -> list[dict[str, str]]:
    """/proc/cpuinfo -> one ``{field: value}`` dict per processor block."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return [b for b in blocks if "processor" in b]


def int_or_none(value: str | None, base: int = 10) -> int | None:
    if value is None:
        return None
    try:
        return int(value, base)
    except ValueError:
        return None


def cpuinfo_topology(blocks: list[dict[str, str]]) -> dict[int, CpuinfoTopology]:
    """Each processor's socket and core id as /proc/cpuinfo states them (the fallback for hidden sysfs)."""
    topology = {}
    for block in blocks:
        processor = int_or_none(block.get("processor"))
        if processor is not None:
            topology[processor] = CpuinfoTopology(socket=int_or_none(block.get("physical id")),
                                                  core_id=int_or_none(block.get("core id")))
    return topology
