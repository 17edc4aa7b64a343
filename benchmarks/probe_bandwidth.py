#!/usr/bin/env python3
"""Is the probe's memory read bandwidth sane? Compare it with two independent tools on this machine.

    apt-get install sysbench mbw          # Debian packages, not needed by the test suite
    python benchmarks/probe_bandwidth.py [--rounds 3] [--seconds 3]

The tools run interleaved, round after round, so a neighbour's load hits all of them alike; each row is
the median over the rounds. Compared:

* ``llamahost``: :mod:`tuner.probe.bandwidth` (numpy ``max()`` per pinned worker process, one per
  physical core), on all cores and on one core;
* ``sysbench memory --memory-oper=read --memory-access-mode=seq``: a C loop reading one 64-bit word at a
  time over a private block per thread, same block size as ours;
* ``mbw`` MEMCPY: single-threaded copy rate (bytes copied per second; the memory traffic is at least
  twice that: every byte is read and written).

The load average before and after and the probe's ``cpu_share`` say how busy the machine was: this
machine is shared, and a figure taken under load is too low for every tool.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.probe import read_host
from tuner.probe.bandwidth import plan_measurement, run_plan

MIB = 1024**2


def llamahost(cpus: set[int], seconds: float) -> tuple[float, float]:
    """(median GB/s, median cpu share) of the probe's measurement restricted to ``cpus``."""
    host = read_host("/")
    plan = plan_measurement(host.topology, seconds=seconds, allowed_cpus=cpus,
                            available_bytes=host.memory_available_bytes)
    samples = [s for taken in run_plan(plan).values() for s in taken]
    return statistics.median(s.gbps for s in samples), statistics.median(s.cpu_share for s in samples)


def sysbench(threads: int, block_mib: int, seconds: float) -> float:
    out = subprocess.run(
        ["sysbench", "memory", f"--memory-block-size={block_mib}M", "--memory-total-size=100000G",
         "--memory-oper=read", "--memory-access-mode=seq", f"--threads={threads}", f"--time={seconds:g}", "run"],
        check=True, capture_output=True, text=True).stdout
    match = re.search(r"\(([\d.]+) MiB/sec\)", out)
    if not match:
        raise RuntimeError(f"unexpected sysbench output:\n{out}")
    return float(match.group(1)) * MIB / 1e9


def mbw(block_mib: int) -> float:
    out = subprocess.run(["mbw", "-q", "-n", "10", "-t0", str(block_mib)],
                         check=True, capture_output=True, text=True).stdout
    match = re.search(r"^AVG.*Copy: ([\d.]+) MiB/s", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"unexpected mbw output:\n{out}")
    return float(match.group(1)) * MIB / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per tool per round")
    args = parser.parse_args()
    missing = [tool for tool in ("sysbench", "mbw") if shutil.which(tool) is None]
    if missing:
        print(f"missing {', '.join(missing)}: apt-get install sysbench mbw", file=sys.stderr)
        return 2

    host = read_host("/")
    topo = host.topology
    primaries = set(topo.primary_cpus())
    one_core = {min(primaries)}
    block_mib = plan_measurement(topo, available_bytes=host.memory_available_bytes).buffer_bytes // MIB
    cores = len(primaries)
    shares: list[float] = []

    def ours(cpus: set[int]) -> Callable[[], float]:
        def run() -> float:
            gbps, share = llamahost(cpus, args.seconds)
            shares.append(share)
            return gbps
        return run

    runs: list[tuple[str, int, Callable[[], float]]] = [
        ("llamahost probe (numpy max, pinned processes)", cores, ours(primaries)),
        ("sysbench memory read, seq", cores, lambda: sysbench(cores, block_mib, args.seconds)),
        ("llamahost probe (numpy max, pinned processes)", 1, ours(one_core)),
        ("sysbench memory read, seq", 1, lambda: sysbench(1, block_mib, args.seconds)),
        ("mbw MEMCPY (copy rate; traffic >= 2x)", 1, lambda: mbw(block_mib)),
    ]
    results: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for index, (_, _, run) in enumerate(runs):
            results[index].append(run())
    load_after = os.getloadavg()[0]

    print(f"host: {host.cpu_vendor} {host.cpu_model}, {cores} physical cores, {len(topo.nodes)} NUMA node(s), "
          f"LLC {sum(topo.llc_size_bytes.values()) // MIB} MiB; block {block_mib} MiB per thread")
    print(f"rounds: {args.rounds} x {args.seconds:g} s per tool; load average {load_before:.2f} before, "
          f"{load_after:.2f} after; llamahost cpu_share median {statistics.median(shares):.2f}")
    print(f"{'tool':<48} {'threads':>7} {'median GB/s':>12}   samples")
    for index, (name, threads, _) in enumerate(runs):
        values = results[index]
        print(f"{name:<48} {threads:>7} {statistics.median(values):>12.2f}   "
              + " ".join(f"{v:.2f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
