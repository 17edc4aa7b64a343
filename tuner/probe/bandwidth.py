"""Measured memory read bandwidth: the denominator of the roofline (tg tok/s <= bandwidth / bytes per token).

How it is measured, and why:

* **Processes, not threads.** One worker process per physical core (its first allowed logical CPU), so
  the GIL cannot serialise the readers. SMT siblings are left out: they share the core's load ports and
  add nothing to a memory-bound stream.
* **Pinned before touching memory.** Each worker calls ``os.sched_setaffinity`` to its CPU *before* it
  allocates and first-touches its buffer, so under the default first-touch policy the pages land on that
  CPU's NUMA node and a per-node figure measures local memory.
* **Single-threaded numpy.** BLAS thread pools are sized to 1 before numpy is imported in the worker
  (OpenBLAS otherwise starts one thread per CPU in every worker).
* **Reads only.** ``buffer.max()`` over a float64 buffer: a vectorised reduction that streams the buffer
  and writes nothing. On the 2-vCPU EPYC guest this was as fast as a BLAS matrix-vector product and faster
  than ``sum`` (benchmarks/probe_bandwidth.py compares it with sysbench and mbw).
* **Much larger than the LLC.** Each worker's buffer is at least 128 MiB and all of them together at
  least 8x the sum of the last-level caches, within a quarter of the available memory.
* **Started together, timed by the wall.** All workers wait on one barrier; each streams whole passes
  until its window ends and reports (start, end, bytes) on the system-wide monotonic clock. One sample is
  the bytes read by all participants divided by the span from the first start to the last end, which
  never flatters a straggler.
* **Contention is measured, not guessed.** Each worker also reports how long it actually ran on its CPU
  during the window; ``cpu_share`` well below 1 means other processes competed for the cores and the
  figure is too low (measure again on an idle host).
* **Repeated and capped.** For each NUMA node (its cores only) and, with more than one node, for all
  nodes together, several samples are taken; the result keeps the median and the raw samples. The
  default budget is about three seconds of streaming; each sample lasts at least 0.1 s and each scope
  gets at least three, so hosts with many nodes can take a little longer.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

from tuner.host_sysfs import Topology
from tuner.probe.host import BandwidthResult

DEFAULT_SECONDS = 3.0
DEFAULT_REPETITIONS = 5
MIN_REPETITIONS = 3
MIN_WINDOW_S = 0.1
MIB = 1024**2
MIN_BUFFER_BYTES = 128 * MIB
LLC_FACTOR = 8  # all buffers together cover at least this many times the summed last-level caches
MEMORY_SHARE = 4  # use at most 1/MEMORY_SHARE of the available memory
STARTUP_TIMEOUT_S = 120.0
BARRIER_TIMEOUT_S = 60.0
METHOD = "numpy float64 max() per pinned worker process, one per physical core; bytes / wall span"
_SINGLE_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
ALL_NODES = "all"


class BandwidthError(RuntimeError):
    """The measurement could not run (worker died or hung, not enough memory, no usable CPU)."""


@dataclass(frozen=True)
class Phase:
    """One scope that is sampled: a NUMA node's cores, or all nodes (``scope == "all"``)."""

    scope: int | str
    workers: tuple[int, ...]  # indexes into BandwidthPlan.worker_cpus


@dataclass(frozen=True)
class BandwidthPlan:
    """Which CPUs stream, over how much memory, for how long. Pure data; see :func:`plan_measurement`."""

    worker_cpus: tuple[int, ...]
    phases: tuple[Phase, ...]
    buffer_bytes: int
    repetitions: int
    window_s: float

    @property
    def streaming_seconds(self) -> float:
        return len(self.phases) * self.repetitions * self.window_s


def plan_measurement(
    topology: Topology,
    *,
    seconds: float = DEFAULT_SECONDS,
    allowed_cpus: Iterable[int] | None = None,
    available_bytes: int | None = None,
) -> BandwidthPlan:
    """Decide workers, buffers, scopes and sample windows for a measurement of about ``seconds``."""
    if not seconds > 0:
        raise ValueError(f"bandwidth measurement time must be positive, got {seconds}")
    allowed = set(allowed_cpus) if allowed_cpus is not None else set(topology.logical_cpus)
    worker_cpus = tuple(
        next(c for c in siblings if c in allowed)
        for siblings in topology.cores().values()
        if any(c in allowed for c in siblings)
    )
    if not worker_cpus:
        raise BandwidthError("no CPU of this host is allowed for this process; cannot measure bandwidth")
    node_of = {c.id: c.node for c in topology.cpus}
    per_node: dict[int, list[int]] = {}
    for index, cpu in enumerate(worker_cpus):
        per_node.setdefault(node_of[cpu], []).append(index)
    phases = [Phase(node, tuple(indexes)) for node, indexes in sorted(per_node.items())]
    if len(phases) > 1:
        phases.append(Phase(ALL_NODES, tuple(range(len(worker_cpus)))))
    else:
        phases = [Phase(ALL_NODES, phases[0].workers)]

    repetitions = DEFAULT_REPETITIONS
    if seconds / (len(phases) * repetitions) < MIN_WINDOW_S:
        repetitions = max(MIN_REPETITIONS, math.floor(seconds / (len(phases) * MIN_WINDOW_S)))
    window = max(MIN_WINDOW_S, seconds / (len(phases) * repetitions))
    return BandwidthPlan(
        worker_cpus=worker_cpus,
        phases=tuple(phases),
        buffer_bytes=buffer_size(topology, len(worker_cpus), available_bytes),
        repetitions=repetitions,
        window_s=window,
    )


def buffer_size(topology: Topology, workers: int, available_bytes: int | None) -> int:
    """Bytes each worker streams over: far beyond the caches, within a share of free memory."""
    llc_total = sum(topology.llc_size_bytes.values())
    wanted = max(MIN_BUFFER_BYTES, math.ceil(LLC_FACTOR * llc_total / workers))
    wanted = math.ceil(wanted / MIB) * MIB
    if available_bytes is None:
        return wanted
    limit = available_bytes // MEMORY_SHARE // workers // MIB * MIB
    floor = max(16 * MIB, math.ceil(2 * llc_total / workers))
    if limit < floor:
        raise BandwidthError(
            f"not enough free memory to measure bandwidth: {workers} workers need at least "
            f"{floor * workers // MIB} MiB beyond the caches, only {available_bytes // MIB} MiB is available")
    return min(wanted, limit)


def _stream_worker(cpu: int, buffer_bytes: int, conn: Connection, barrier: Barrier) -> None:
    """Worker process: pin, allocate and first-touch, then stream on command until told to stop."""
    try:
        os.sched_setaffinity(0, {cpu})
        for name in _SINGLE_THREAD_ENV:
            os.environ[name] = "1"
        import numpy as np  # after the environment above: sizes OpenBLAS' pool to one thread

        buffer = np.empty(buffer_bytes // 8, dtype=np.float64)
        buffer.fill(1.0)  # first touch, from the pinned CPU: pages land on its node
        buffer.max()
        conn.send(("ready", None))
        while (command := conn.recv()) is not None:
            window_s, participate = command
            barrier.wait(timeout=BARRIER_TIMEOUT_S)
            if not participate:
                conn.send(("idle", None))
                continue
            cpu_start = time.thread_time()
            start = time.monotonic()
            deadline = start + window_s
            passes = 0
            while True:
                buffer.max()
                passes += 1
                now = time.monotonic()
                if now >= deadline:
                    break
            on_cpu = time.thread_time() - cpu_start
            conn.send(("sample", Span(start, now, passes * buffer.nbytes, on_cpu)))
    except BaseException as exc:  # report anything, including a broken barrier, then die
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


@dataclass
class _Worker:
    cpu: int
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection

    def receive(self, timeout: float) -> tuple[str, Any]:
        try:
            if not self.conn.poll(timeout):
                raise BandwidthError(f"bandwidth worker on CPU {self.cpu} did not answer within {timeout:.0f} s")
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=1)
            raise BandwidthError(
                f"bandwidth worker on CPU {self.cpu} died (exit code {self.process.exitcode})") from None
        if kind == "error":
            raise BandwidthError(f"bandwidth worker on CPU {self.cpu} failed: {payload}")
        return str(kind), payload


@dataclass(frozen=True)
class Span:
    """What one worker did in one sample window (times on the system-wide monotonic clock)."""

    start: float
    end: float
    bytes_read: int
    cpu_seconds: float  # time the worker actually ran: less than end - start means others competed


@dataclass(frozen=True)
class Sample:
    gbps: float
    cpu_share: float


def aggregate_sample(spans: Sequence[Span]) -> Sample:
    """One sample: all bytes over the span from the first start to the last end, and how much of their
    windows the workers actually spent on a CPU."""
    first = min(s.start for s in spans)
    last = max(s.end for s in spans)
    gbps = sum(s.bytes_read for s in spans) / (last - first) / 1e9
    share = sum(s.cpu_seconds for s in spans) / sum(s.end - s.start for s in spans)
    return Sample(gbps=gbps, cpu_share=min(share, 1.0))


def _run_phase(workers: Sequence[_Worker], phase: Phase, plan: BandwidthPlan) -> list[Sample]:
    participants = set(phase.workers)
    samples = []
    for _ in range(plan.repetitions):
        for index, worker in enumerate(workers):
            worker.conn.send((plan.window_s, index in participants))
        spans = []
        for index, worker in enumerate(workers):
            kind, payload = worker.receive(BARRIER_TIMEOUT_S + 10 * plan.window_s + 30)
            if index in participants:
                if kind != "sample":
                    raise BandwidthError(f"bandwidth worker on CPU {worker.cpu} answered {kind!r}")
                spans.append(payload)
        samples.append(aggregate_sample(spans))
    return samples


def run_plan(plan: BandwidthPlan) -> dict[int | str, list[Sample]]:
    """Start the workers, take every sample of every phase, stop the workers. Samples by scope."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(plan.worker_cpus))
    workers: list[_Worker] = []
    try:
        for cpu in plan.worker_cpus:
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_stream_worker, args=(cpu, plan.buffer_bytes, child_end, barrier),
                name=f"llamahost-bandwidth-cpu{cpu}", daemon=True)
            process.start()
            child_end.close()
            workers.append(_Worker(cpu, process, parent_end))
        for worker in workers:
            worker.receive(STARTUP_TIMEOUT_S)
        samples = {phase.scope: _run_phase(workers, phase, plan) for phase in plan.phases}
        for worker in workers:
            worker.conn.send(None)
        for worker in workers:
            worker.process.join(timeout=10)
        return samples
    finally:
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            worker.conn.close()


def measure_bandwidth(
    topology: Topology,
    *,
    seconds: float = DEFAULT_SECONDS,
    available_bytes: int | None = None,
) -> BandwidthResult:
    """Measure this machine's memory read bandwidth, per NUMA node and for all nodes, in GB/s.

    ``topology`` must describe the machine this runs on; CPUs outside this process' affinity are not
    used. Raises :class:`BandwidthError` when the measurement cannot run.
    """
    plan = plan_measurement(topology, seconds=seconds, allowed_cpus=os.sched_getaffinity(0),
                            available_bytes=available_bytes)
    started = time.monotonic()
    samples = run_plan(plan)
    elapsed = time.monotonic() - started
    all_samples = [s.gbps for s in samples[ALL_NODES]]
    node_samples = {int(scope): [s.gbps for s in taken] for scope, taken in samples.items() if scope != ALL_NODES}
    if not node_samples:  # one node: its figure is the all-nodes figure
        node_samples = {topology.cpu(plan.worker_cpus[0]).node: all_samples}
    cpu_share = statistics.median(s.cpu_share for taken in samples.values() for s in taken)
    return BandwidthResult(
        all_nodes_gbps=round(statistics.median(all_samples), 2),
        per_node_gbps={node: round(statistics.median(s), 2) for node, s in sorted(node_samples.items())},
        threads=len(plan.worker_cpus),
        buffer_bytes=plan.buffer_bytes,
        samples_gbps=tuple(round(s, 2) for s in all_samples),
        method=METHOD,
        per_node_samples_gbps={node: tuple(round(x, 2) for x in s) for node, s in sorted(node_samples.items())},
        seconds=round(elapsed, 2),
        cpu_share=round(cpu_share, 3),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
