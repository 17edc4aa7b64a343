"""Where a served model's pages sit in memory, when they must be put back, and how to read them.

An mmap'd model lives in the page cache, and a page there stays on the NUMA node of whoever first faulted it,
across processes and server restarts. A trial that binds memory to node 0 after one that bound it to node 1
therefore measures node-1 pages: NUMA trials would depend on their order. So before a server starts with a
placement other than the previous one's, the model's pages are dropped (``POSIX_FADV_DONTNEED`` on the files,
never a host-wide drop_caches) while no process maps them, and the new server faults them in under its own
policy. Every path does this: the benchmark trials (:class:`tuner.search.Measurer`), the local supervisor and
the systemd unit over SSH.

What happened is read back, never assumed: ``/proc/<pid>/numa_maps`` of the running server names the memory
policy it runs under (the kernel prints the task's policy for a mapping that has none of its own) and, per node,
how many of the model's pages it maps there.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.config import RunConfig, parse_cpu_list
from tuner.cpu_lists import format_cpu_list
from tuner.host_sysfs import Topology

PlacementKey = tuple[Any, ...]


def page_placement(config: RunConfig) -> PlacementKey:
    """The settings that decide on which node a page the server faults in lands (CPUs for first touch, the
    memory policy and its nodes, llama.cpp's NUMA mode, and how the model is loaded)."""
    return (config.numa, config.memory_policy, config.memory_nodes, config.cpus, config.load_mode)


def policy_nodes(config: RunConfig, topology: Topology) -> tuple[int, ...]:
    """The nodes of a memory policy, as the role picks them: the configured nodes, else the nodes of the
    pinned CPUs, else every node."""
    if config.memory_nodes:
        return config.memory_nodes
    return topology.nodes_of(config.cpus) if config.cpus else topology.node_ids


def needs_page_reset(placed_for: PlacementKey | None, config: RunConfig, *, multi_node: bool) -> bool:
    """Whether the model's pages must be dropped before ``config`` starts: on a host with one node every page
    is local anyway; else whenever the pages were placed for another placement, or nobody knows for which."""
    return multi_node and placed_for != page_placement(config)


def evict_page_cache(files: Iterable[Path]) -> None:
    """Drop these files' clean pages from the page cache so the next reader places them afresh. Pages that a
    running process maps stay: stop the server first."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_CHUNK = 1 << 30  # mincore over 1 GiB at a time: a byte per page, so 256 KiB of vector per call


def resident_bytes(files: Iterable[Path]) -> int:
    """How much of these files sits in the page cache now (``mincore`` over a mapping that faults nothing in;
    what util-linux's fincore does), without privileges."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = 0
    for path in files:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, size, _CHUNK):
                length = min(_CHUNK, size - offset)
                address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
                if address in (None, ctypes.c_void_p(-1).value):
                    raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
                try:
                    vector = ctypes.create_string_buffer((length + page - 1) // page)
                    if libc.mincore(address, length, vector) != 0:
                        raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
                    resident += sum(byte & 1 for byte in vector.raw) * page
                finally:
                    libc.munmap(address, length)
        finally:
            os.close(fd)
    return resident


def page_reset_blocked(files: Sequence[Path]) -> str | None:
    """Why the model's pages cannot be put back on this host (None: they can). Drops them once and looks:
    pages that stay cached are mapped by another process (a running llama-server, say), and would keep the
    placement it gave them whatever a trial asks for."""
    evict_page_cache(files)
    left = resident_bytes(files)
    total = sum(path.stat().st_size for path in files)
    if left <= total // 100:
        return None
    return (f"{left / 2**20:.0f} MiB of the model stay in the page cache after its pages were dropped: another "
            "process maps the model file (a running llama-server?), so its pages keep the placement that process "
            "gave them and NUMA trials would measure that instead of their own")


def evict_shell(files: Sequence[str]) -> str:
    """The same for a host reached over SSH: GNU dd's ``iflag=nocache count=0`` advises DONTNEED for a whole
    file without reading it."""
    return "".join(f"dd if={shlex.quote(path)} iflag=nocache count=0 status=none\n" for path in files)


# ---- reading it back --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MappedPages:
    """One file as a process maps it, from ``/proc/<pid>/numa_maps``."""

    policy: str  # the mode as the kernel names it: default, bind, interleave, prefer, local, ...
    policy_nodes: tuple[int, ...]
    pages_per_node: Mapping[int, int]

    @property
    def nodes_used(self) -> tuple[int, ...]:
        return tuple(sorted(node for node, pages in self.pages_per_node.items() if pages))

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "policy_nodes": format_cpu_list(self.policy_nodes),
                "pages_per_node": {str(node): pages for node, pages in sorted(self.pages_per_node.items())}}


def cpus_allowed(proc_status: str) -> tuple[int, ...] | None:
    """The CPUs a process may run on, from the text of its threads' ``/proc/<pid>/task/*/status`` (or of
    ``/proc/<pid>/status`` alone): the union of their masks, None when the text has no such line.

    The union, because with strict placement (``--cpu-strict 1``) llama.cpp narrows single threads, its main
    thread included, to one CPU of the process's set: the main thread alone would report one CPU."""
    found: set[int] = set()
    seen = False
    for line in proc_status.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            found.update(parse_cpu_list(line.split(":", 1)[1]))
            seen = True
    return tuple(sorted(found)) if seen else None


def threads_status(pid: int) -> str:
    """``/proc/<pid>/task/*/status`` of every thread, concatenated (a thread that ends meanwhile is skipped);
    read with :func:`cpus_allowed`."""
    texts = []
    for path in sorted(Path(f"/proc/{pid}/task").glob("*/status")):
        try:
            texts.append(path.read_text())
        except OSError:
            continue
    return "".join(texts)


def model_file_names(files: Iterable[str | Path]) -> tuple[str, ...]:
    """A model's shards as given and as resolved: numa_maps names the file the kernel opened, past any
    symlink (the role links the served name to a versioned file)."""
    given = [str(path) for path in files]
    return tuple(dict.fromkeys([*given, *(os.path.realpath(path) for path in given)]))


_NODE_PAGES = re.compile(r"^N(\d+)=(\d+)$")


def mapped_pages(numa_maps: str, files: Iterable[str]) -> MappedPages | None:
    """The pages of ``files`` in one process' numa_maps, summed over every mapping of them (None when the
    process maps none of them). The policy is the first mapping's (mpol_to_str: ``mode[=flags][:nodes]``)."""
    wanted = set(files)
    policy: tuple[str, tuple[int, ...]] | None = None
    pages: dict[int, int] = {}
    for line in numa_maps.splitlines():
        fields = line.split()
        if len(fields) < 3 or not any(f"file={path}" == field for field in fields for path in wanted):
            continue
        if policy is None:
            mode, _, nodes = fields[1].partition(":")
            policy = (mode.split("=", 1)[0], tuple(parse_cpu_list(nodes)) if nodes else ())
        for field in fields[2:]:
            match = _NODE_PAGES.match(field)
            if match:
                node = int(match.group(1))
                pages[node] = pages.get(node, 0) + int(match.group(2))
    if policy is None:
        return None
    return MappedPages(policy=policy[0], policy_nodes=policy[1], pages_per_node=pages)


def placement_problem(config: RunConfig, policy_nodes: Sequence[int], mapped: MappedPages | None, *,
                      cpus_allowed: Sequence[int] | None, pages_placed: bool) -> str | None:
    """Why a running server is not placed as ``config`` says, from what /proc reads back (None: it is).

    ``policy_nodes``: the nodes the policy was asked for; ``pages_placed``: the model's pages were dropped
    before this placement started, so each page sits where this server's policy put it and a bind policy
    leaves none outside its nodes."""
    if config.cpus and cpus_allowed is not None and set(cpus_allowed) != set(config.cpus):
        return (f"the CPU mask {format_cpu_list(config.cpus)} did not take effect: the server may run on "
                f"CPUs {format_cpu_list(cpus_allowed)}")
    if mapped is None:
        return None  # the model is not mapped (--no-mmap): nothing of it to read back
    wanted = config.memory_policy
    if wanted == "default":
        if mapped.policy != "default":
            return f"the memory policy default did not take effect: the server runs under {mapped.policy}"
        return None
    if (mapped.policy, tuple(sorted(mapped.policy_nodes))) != (wanted, tuple(sorted(policy_nodes))):
        return (f"the memory policy {wanted} on nodes {format_cpu_list(policy_nodes)} did not take effect: "
                f"the server runs under {mapped.policy} on nodes {format_cpu_list(mapped.policy_nodes) or '-'}")
    stray = sorted(set(mapped.nodes_used) - set(policy_nodes))
    if wanted == "bind" and pages_placed and stray:
        count = sum(mapped.pages_per_node[node] for node in stray)
        return (f"{count} of the model's pages sit on nodes {format_cpu_list(stray)} although memory is bound "
                f"to nodes {format_cpu_list(policy_nodes)}")
    return None
