"""Put a process, and the memory it will allocate, where a trial says - before the model loads.

llama.cpp has no CPU-mask option, and its ``--numa numactl`` mode expects to be started under numactl.
A trial worker does what numactl would do, to itself and without depending on numactl being installed:
``sched_setaffinity`` for the CPUs and the ``set_mempolicy`` system call for memory; the llama-server it
then starts inherits both, and so do the threads ggml and OpenMP create later. Where the model's page-cache
pages sit is :mod:`tuner.model_pages`' business.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterable

MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
POLICY_MODES = {"default": MPOL_DEFAULT, "bind": MPOL_BIND, "interleave": MPOL_INTERLEAVE}
MODE_NAMES = {v: k for k, v in POLICY_MODES.items()} | {MPOL_PREFERRED: "preferred"}

# set_mempolicy / get_mempolicy system call numbers per architecture (asm/unistd.h).
_SYSCALLS = {
    "x86_64": {"set_mempolicy": 238, "get_mempolicy": 239},
    "aarch64": {"set_mempolicy": 237, "get_mempolicy": 236},
}
_WORD_BITS = 8 * ctypes.sizeof(ctypes.c_ulong)


class PlacementError(RuntimeError):
    """The kernel refused a placement (e.g. a node without memory, or no NUMA support)."""


def nodemask_words(nodes: Iterable[int]) -> list[int]:
    """The ``unsigned long`` words of a kernel nodemask with the given node bits set."""
    node_list = sorted(set(nodes))
    if not node_list:
        return [0]
    if node_list[0] < 0:
        raise ValueError("node ids must be >= 0")
    words = [0] * (node_list[-1] // _WORD_BITS + 1)
    for node in node_list:
        words[node // _WORD_BITS] |= 1 << (node % _WORD_BITS)
    return words


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _syscall_number(name: str) -> int:
    machine = platform.machine()
    try:
        return _SYSCALLS[machine][name]
    except KeyError:
        raise PlacementError(f"{name} is not supported on {machine}") from None


def set_memory_policy(policy: str, nodes: Iterable[int]) -> None:
    """Apply a memory policy to the calling thread (and the threads it creates later)."""
    if policy not in POLICY_MODES:
        raise ValueError(f"unknown memory policy {policy!r}")
    mode = POLICY_MODES[policy]
    libc = _libc()
    if mode == MPOL_DEFAULT:
        result = libc.syscall(_syscall_number("set_mempolicy"), MPOL_DEFAULT, None, ctypes.c_ulong(0))
    else:
        words = nodemask_words(nodes)
        mask = (ctypes.c_ulong * len(words))(*words)
        # The kernel reads maxnode - 1 bits (a historic off-by-one that libnuma also works around).
        maxnode = ctypes.c_ulong(len(words) * _WORD_BITS + 1)
        result = libc.syscall(_syscall_number("set_mempolicy"), mode, mask, maxnode)
    if result != 0:
        err = ctypes.get_errno()
        raise PlacementError(f"set_mempolicy({policy}, nodes={sorted(set(nodes))}) failed: {os.strerror(err)}")


def current_memory_policy() -> tuple[str, tuple[int, ...]]:
    """The calling thread's memory policy and its nodes, read back from the kernel."""
    libc = _libc()
    mode = ctypes.c_int(0)
    words = 16
    mask = (ctypes.c_ulong * words)()
    result = libc.syscall(_syscall_number("get_mempolicy"), ctypes.byref(mode), mask,
                          ctypes.c_ulong(words * _WORD_BITS), None, ctypes.c_ulong(0))
    if result != 0:
        err = ctypes.get_errno()
        raise PlacementError(f"get_mempolicy failed: {os.strerror(err)}")
    nodes = tuple(i * _WORD_BITS + bit for i, word in enumerate(mask) for bit in range(_WORD_BITS)
                  if word >> bit & 1)
    return MODE_NAMES.get(mode.value, str(mode.value)), nodes


def pin_to_cpus(cpus: Iterable[int]) -> tuple[int, ...]:
    """Restrict the calling process to ``cpus`` and read the mask back; returns it.

    The kernel quietly narrows a mask to the CPUs the process may use (its cgroup cpuset: user.slice on a
    host partitioned by the cpu role, a taskset around the tuner). A trial pinned that way would measure a
    configuration other than the one it records, so a mask that did not take is a :class:`PlacementError`.
    """
    wanted = set(cpus)
    if not wanted:
        return tuple(sorted(os.sched_getaffinity(0)))
    allowed = sorted(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        raise PlacementError(f"cannot pin to CPUs {sorted(wanted)} ({exc.strerror}): this process may only "
                             f"run on CPUs {allowed}") from None
    applied = tuple(sorted(os.sched_getaffinity(0)))
    if set(applied) != wanted:
        raise PlacementError(f"the CPU mask {sorted(wanted)} did not take effect: the kernel applied "
                             f"{list(applied)} (this process may only run on CPUs {allowed})")
    return applied


def check_memory_policy(wanted: str, nodes: Iterable[int], applied: tuple[str, tuple[int, ...]]) -> None:
    """A memory policy read back from the kernel (:func:`current_memory_policy`) must be the one asked for."""
    if applied != (wanted, tuple(sorted(set(nodes)))):
        raise PlacementError(f"the memory policy {wanted} on nodes {sorted(set(nodes))} did not take effect: "
                             f"the kernel reports {applied[0]} on nodes {list(applied[1])}")
