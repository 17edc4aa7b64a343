"""``llamahost probe``: what this host is (topology, memory, ISA, kernel settings, memory bandwidth).

Without ``--no-bandwidth`` the memory read bandwidth is measured once per host fingerprint (a few
seconds, every core busy) and cached; ``--remeasure`` measures again. ``--root DIR`` reads a recorded
/sys + /proc tree instead of this machine (bandwidth cannot be measured there).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console

from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError
from tuner.host_sysfs import NumaNode, Topology
from tuner.output import console, human_bytes, print_json, table
from tuner.probe.bandwidth import DEFAULT_SECONDS, BandwidthError
from tuner.probe.collect import LIVE_ROOT, probe_host, read_host
from tuner.probe.host import HostProbe, KernelSettings


def register(sub: Any) -> None:
    parser = sub.add_parser("probe", help="show this host: topology, memory, ISA, kernel settings, bandwidth")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON (HostProbe.to_dict)")
    parser.add_argument("--no-bandwidth", action="store_true",
                        help="skip the memory bandwidth (no measurement, no cache lookup): fast")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the bandwidth again even if this host's result is cached")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"streaming time budget of a bandwidth measurement (default {DEFAULT_SECONDS})")
    parser.add_argument("--root", type=Path, default=None,
                        help="read /sys and /proc under this directory (a recorded tree) instead of this host")
    parser.set_defaults(handler=run_probe)


def _validate(args: argparse.Namespace) -> None:
    if args.no_bandwidth and args.remeasure:
        raise UserError("--remeasure and --no-bandwidth contradict each other",
                        "drop one: --remeasure measures the bandwidth again, --no-bandwidth skips it")
    if not args.seconds > 0:
        raise UserError(f"--seconds must be positive, got {args.seconds}",
                        f"give a measurement time such as --seconds {DEFAULT_SECONDS}")
    if args.root is not None:
        if not (args.root / "sys").is_dir() and not (args.root / "proc").is_dir():
            raise UserError(f"{args.root} holds neither sys/ nor proc/",
                            "point --root at a recorded tree such as tests/fixtures/hosts/<name>")
        if args.remeasure:
            raise UserError("--remeasure measures this machine and cannot be combined with --root",
                            "drop --remeasure (bandwidth is never measured for a recorded tree)")


def run_probe(args: argparse.Namespace) -> int:
    _validate(args)
    if args.root is not None:
        probe = read_host(args.root)
    else:
        try:
            probe = probe_host(bandwidth=not args.no_bandwidth, remeasure=args.remeasure,
                               bandwidth_seconds=args.seconds)
        except BandwidthError as exc:  # the rest of the probe is still worth showing
            probe = read_host(LIVE_ROOT)
            probe = dataclasses.replace(probe, warnings=(*probe.warnings, f"bandwidth not measured: {exc}"))
    if args.json:
        print_json(probe.to_dict())
        return 0
    show(probe, console())
    return 0


def show(probe: HostProbe, out: Console) -> None:
    """Print the probe as tables: host, NUMA nodes, kernel settings, bandwidth, warnings."""
    topo = probe.topology
    out.print(table(f"Host {probe.hostname} (fingerprint {probe.fingerprint()})", ("field", "value"), [
        ("CPU", f"{probe.cpu_vendor} {probe.cpu_model} ({probe.architecture})"),
        ("kernel", probe.kernel_release),
        ("layout", f"{len(topo.sockets)} socket(s), {len(topo.nodes)} NUMA node(s), "
                   f"{topo.physical_core_count} cores x {topo.threads_per_core} thread(s) = "
                   f"{len(topo.cpus)} logical CPUs, {len(topo.llc_domains)} LLC domain(s)"),
        ("memory", f"{human_bytes(probe.memory_total_bytes)} total, "
                   f"{human_bytes(probe.memory_available_bytes)} available"),
        ("ISA", " ".join(probe.isa) or "none recognised"),
        ("usable CPUs", format_cpu_list(probe.allowed_cpus) if probe.allowed_cpus is not None else "unknown"),
    ]))
    columns = ("node", "CPUs", "cores", "SMT", "LLC", "memory (free)", "hugepages free/total", "distances")
    out.print(table("NUMA nodes", columns, [_node_row(topo, node) for node in topo.nodes]))
    out.print(table("Kernel settings", ("setting", "value", "note"), _kernel_rows(probe.kernel, topo)))
    if probe.bandwidth is not None:
        bw = probe.bandwidth
        rows = [(f"node {node}", f"{gbps:.1f}", _spread(bw.per_node_samples_gbps.get(node, ())))
                for node, gbps in bw.per_node_gbps.items()]
        if len(topo.nodes) > 1:
            rows.append(("all nodes", f"{bw.all_nodes_gbps:.1f}", _spread(bw.samples_gbps)))
        title = (f"Memory read bandwidth, GB/s ({bw.threads} workers x {human_bytes(bw.buffer_bytes)}, "
                 f"measured {bw.measured_at})")
        out.print(table(title, ("scope", "median", "samples min-max"), rows))
        if len(bw.runs_gbps) > 1:
            out.print(f"the best of {len(bw.runs_gbps)} measurements of this host, which read "
                      f"{_spread(bw.runs_gbps)} GB/s: what this memory can deliver when nothing else competes")
        if bw.contended:
            out.print(f"[yellow]warning:[/] the bandwidth workers ran only {bw.cpu_share:.0%} of the time "
                      "(other processes competed for the CPUs): the figure is too low; run "
                      "`llamahost probe --remeasure` on an idle host")
    else:
        out.print("memory bandwidth: not measured")
    for warning in probe.warnings:
        out.print(f"[yellow]warning:[/] {warning}")


def _spread(samples: Iterable[float]) -> str:
    values = list(samples)
    return f"{min(values):.1f}-{max(values):.1f} (n={len(values)})" if values else ""


def _node_row(topo: Topology, node: NumaNode) -> tuple[str, ...]:
    cpus = [topo.cpu(c) for c in node.cpus]
    cores = {c.core for c in cpus}
    llcs = sorted({c.llc for c in cpus})
    llc_text = f"{len(llcs)}" + (f" x {_short_size(topo.llc_size_bytes[llcs[0]])}"
                                 if llcs and llcs[0] in topo.llc_size_bytes else "")
    smt = f"{len(cpus) // len(cores)}" if cores else "-"
    memory = f"{node.memory_total_bytes / 1024**3:.1f} ({node.memory_free_bytes / 1024**3:.1f}) GiB"
    return (str(node.id), format_cpu_list(node.cpus) or "-", str(len(cores)), smt, llc_text, memory,
            _hugepages(node.hugepages_total, node.hugepages_free), " ".join(map(str, node.distances)))


def _short_size(n_bytes: int) -> str:
    """``2097152`` -> ``2M``: page and cache sizes are powers of two."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n_bytes >= scale and n_bytes % scale == 0:
            return f"{n_bytes // scale}{unit}"
    return f"{n_bytes}B"


def _hugepages(total: dict[int, int], free: dict[int, int]) -> str:
    """Reserved hugepages per size, ``2M 1000/1024, 1G 4/4``; sizes with none reserved are left out."""
    return ", ".join(f"{_short_size(size * 1024)} {free.get(size, 0)}/{count}"
                     for size, count in total.items() if count) or "none"


def _counted(values: dict[str, int]) -> str | None:
    return ", ".join(f"{name} x{count}" for name, count in values.items()) or None


def _kernel_rows(kernel: KernelSettings, topo: Topology) -> list[tuple[str, str | None, str]]:
    multi_node = len(topo.nodes_with_cpus) > 1
    hidden = "not exposed here"
    memlock = ("unlimited" if kernel.memlock_limit_bytes is None else human_bytes(kernel.memlock_limit_bytes)) \
        if kernel.memlock_limit_known else "unknown"
    return [
        ("THP enabled / defrag", f"{kernel.thp_enabled} / {kernel.thp_defrag}",
         "helps anonymous memory only (KV cache, --no-mmap weights)"),
        ("kernel.numa_balancing", _or(kernel.numa_balancing, hidden),
         "on: pages migrate under pinned threads; ggml warns" if multi_node and kernel.numa_balancing else ""),
        ("vm.zone_reclaim_mode", _or(kernel.zone_reclaim_mode, hidden), ""),
        ("SMT control", _or(kernel.smt_control, hidden), ""),
        ("cpufreq governor", _counted(kernel.governors) or hidden, "no cpufreq: VM or container" if
         not kernel.governors else ""),
        ("energy/perf preference", _counted(kernel.energy_performance_preference) or hidden, ""),
        ("hugepages free/total", _hugepages(kernel.hugepages_total, kernel.hugepages_free),
         "mmap'd GGUF weights do not use them"),
        ("RLIMIT_MEMLOCK", memlock, "mlock possible" if kernel.can_lock_memory else "mlock not possible"),
    ]


def _or(value: object, fallback: str) -> str:
    return fallback if value is None else str(value)
