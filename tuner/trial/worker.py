"""Trial worker: one fresh process per trial, the pyperf manager/worker split.

Run as ``python -m tuner.trial.worker FD``. It reads a :class:`TrialSpec` from stdin, applies CPU
affinity and memory policy to itself and reads both back, then starts the llama-server build the role
deploys (``TrialSpec.server_binary``) with the trial's flags; the server inherits the placement, and its
CPU mask is read back too. It measures prompt processing (pp) and token generation (tg) the way
llama-bench does, through the server: fixed token sequences, the server's own timings. A benchmark
winner is therefore measured on the binary and kernels that will serve it, not on a Python binding's
build of llama.cpp. Results stream back as JSON lines on file descriptor FD.

Any failure ends the process with a non-zero status after an ``error`` event when it can still write
one; the manager turns that (or a silent death such as the OOM killer's SIGKILL) into a failed trial.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tuner.config import RunConfig
from tuner.model.gguf_file import inspect_model
from tuner.model_pages import (
    MappedPages,
    cpus_allowed,
    mapped_pages,
    model_file_names,
    placement_problem,
    threads_status,
)
from tuner.server.client import complete, model_meta
from tuner.server.identity import identify
from tuner.server.process import ServerProcess
from tuner.stats import sampling_should_stop, warmup_is_stable
from tuner.trial.placement import check_memory_policy, current_memory_policy, pin_to_cpus, set_memory_policy
from tuner.trial.protocol import TrialSpec, measures_pp, measures_tg

# No host-memory prompt cache: it would hand pp a prompt it processed before.
BENCH_SERVER_ARGS = ("--cache-ram", "0")
# The manager's deadline (MeasureSettings.timeout_for, scaled by the model's size) is what bounds a slow load.
LOAD_TIMEOUT_S = 24 * 3600.0


class WorkerError(RuntimeError):
    pass


class Emitter:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: str, **payload: Any) -> None:
        self.stream.write(json.dumps({"event": event, **payload}) + "\n")
        self.stream.flush()


class ServerBench:
    """The deployed llama-server build, started with one trial's configuration, measured like llama-bench.

    pp: a fixed prompt of random token ids processed from an empty cache (the server's prompt timings).
    tg: a fixed number of tokens generated after that prompt, greedy, end-of-sequence ignored (the server's
    generation timings, which include sampling as serving does). The server's own accounting excludes HTTP.
    """

    def __init__(self, spec: TrialSpec, server: ServerProcess) -> None:
        self.server = server
        workload = spec.workload
        n_vocab = int(model_meta(server.base_url).get("n_vocab") or 0)
        if n_vocab < 1:
            raise WorkerError("the server reports a model without a vocabulary: it cannot be benchmarked")
        rng = random.Random(workload.seed)
        self.prompt = [rng.randrange(n_vocab) for _ in range(workload.pp_tokens)]
        self.tg_tokens = workload.tg_tokens

    def run_pp(self) -> float:
        timings = complete(self.server.base_url, self.prompt, 1, ignore_eos=True, cache_prompt=False).timings
        if timings.prompt_n != len(self.prompt):
            raise WorkerError(f"the server processed {timings.prompt_n} of the prompt's {len(self.prompt)} tokens")
        return timings.prompt_per_second

    def run_tg(self) -> float:
        timings = complete(self.server.base_url, self.prompt, self.tg_tokens, ignore_eos=True,
                           cache_prompt=True).timings
        if timings.predicted_n != self.tg_tokens:
            raise WorkerError(f"the server generated {timings.predicted_n} of {self.tg_tokens} tokens")
        return timings.predicted_per_second


def objective_value(objective: str, pp: float | None, tg: float | None) -> float:
    """The number Optuna maximizes: tg or pp tokens/s, or for ``both`` their geometric mean."""
    if objective == "tg" and tg is not None:
        return tg
    if objective == "pp" and pp is not None:
        return pp
    if objective == "both" and pp is not None and tg is not None:
        return math.sqrt(pp * tg)
    raise ValueError(f"objective {objective} needs measurements that were not taken")


def _metrics(pp: float | None, tg: float | None) -> dict[str, float]:
    return {name: value for name, value in (("pp_tps", pp), ("tg_tps", tg)) if value is not None}


def measure(spec: TrialSpec, bench: ServerBench, emit: Callable[..., None]) -> None:
    do_pp, do_tg = measures_pp(spec.objective), measures_tg(spec.objective)

    def one_run() -> tuple[float | None, float | None]:
        pp = bench.run_pp() if do_pp else None
        tg = bench.run_tg() if do_tg else None
        return pp, tg

    started = time.perf_counter()
    warm_values: list[float] = []
    stable = False
    for i in range(spec.warmup.max_runs):
        pp, tg = one_run()
        warm_values.append(objective_value(spec.objective, pp, tg))
        stable = warmup_is_stable(warm_values, window=spec.warmup.window, tolerance=spec.warmup.tolerance)
        emit("warmup", i=i, pp_tps=pp, tg_tps=tg, value=warm_values[-1], stable=stable)
        if stable or time.perf_counter() - started > spec.warmup.max_seconds:
            break
    warmup_seconds = time.perf_counter() - started

    values: list[float] = []
    deadline = time.perf_counter() + spec.max_measure_seconds
    reason: str | None = None
    while reason is None:
        pp, tg = one_run()
        values.append(objective_value(spec.objective, pp, tg))
        emit("sample", i=len(values) - 1, value=values[-1], metrics=_metrics(pp, tg))
        reason = sampling_should_stop(values, spec.stop)
        if reason is None and time.perf_counter() > deadline:
            reason = "max-time"
    measure_seconds = time.perf_counter() - started - warmup_seconds

    # The metric the objective does not optimise is still worth reporting: a couple of runs, marked.
    info_started = time.perf_counter()
    info_pp = [bench.run_pp() for _ in range(2)] if not do_pp else []
    info_tg = [bench.run_tg() for _ in range(2)] if not do_tg else []
    emit("done", reason=reason, warmup_stable=stable, warmup_runs=len(warm_values),
         warmup_seconds=warmup_seconds, measure_seconds=measure_seconds,
         info_seconds=time.perf_counter() - info_started,
         info={name: runs for name, runs in (("pp_tps", info_pp), ("tg_tps", info_tg)) if runs})


def bench_config(config: RunConfig, spec: TrialSpec) -> RunConfig:
    """The trial's configuration on one slot whose context holds the workload (what llama-bench measures)."""
    return dataclasses.replace(config, parallel=1, ctx_size=spec.workload.n_ctx())


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the manager dies (even by SIGKILL), so a killed
    controller never leaves a benchmark running that would disturb the next run's measurements."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def model_pages_of(pid: int, spec: TrialSpec, config: RunConfig) -> MappedPages | None:
    """Where the server's mapping of the model sits, read from its numa_maps as for a live trial (None where
    llama.cpp does not mmap the model); a policy that did not reach the model's pages fails the trial."""
    try:
        numa_maps = Path(f"/proc/{pid}/numa_maps").read_text()
    except FileNotFoundError:
        return None  # a kernel built without NUMA support has no numa_maps: one node, nothing to place
    mapped = mapped_pages(numa_maps, model_file_names(inspect_model(Path(spec.model_path)).files))
    problem = placement_problem(config, config.memory_nodes, mapped, cpus_allowed=None,
                                pages_placed=spec.pages_placed)
    if problem:
        raise WorkerError(f"llama-server is not placed as the trial asks: {problem}")
    return mapped


def run(spec: TrialSpec, emit: Callable[..., None]) -> None:
    die_with_parent()
    config = RunConfig.from_dict(spec.config).validate()
    applied_cpus = pin_to_cpus(config.cpus)
    if config.memory_policy != "default":
        nodes = config.memory_nodes
        if not nodes:
            raise WorkerError("memory policy without nodes: the manager must resolve memory_nodes")
        set_memory_policy(config.memory_policy, nodes)
    policy = current_memory_policy()
    if config.memory_policy != "default":
        check_memory_policy(config.memory_policy, config.memory_nodes, policy)

    binary = identify(Path(spec.server_binary))
    started = time.perf_counter()
    # The server inherits this process' CPU mask and memory policy (set and read back above): one placement,
    # applied before llama.cpp starts, whatever launches it.
    server = ServerProcess(Path(binary.path), Path(spec.model_path), bench_config(config, spec),
                           metrics=False, extra_args=BENCH_SERVER_ARGS, inherit_placement=True)
    with server:  # started here, stopped (whole process group) on the way out
        server.wait_healthy(timeout_s=LOAD_TIMEOUT_S)
        load_seconds = time.perf_counter() - started
        server_cpus = cpus_allowed(threads_status(server.pid)) or ()
        if server_cpus != applied_cpus:
            raise WorkerError(f"llama-server runs on CPUs {list(server_cpus)}, not the trial's {list(applied_cpus)}")
        pages = model_pages_of(server.pid, spec, config)
        bench = ServerBench(spec, server)
        emit("ready", pid=server.pid, load_seconds=load_seconds, cpus=list(server_cpus),
             memory_policy=policy[0], memory_nodes=list(policy[1]), system_info=binary.system_info,
             binary_sha256=binary.sha256, **({"model_pages": pages.to_dict()} if pages is not None else {}))
        measure(spec, bench, emit)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuner.trial.worker RESULT_FD < spec.json", file=sys.stderr)
        return 2
    stream = os.fdopen(int(args[0]), "w", buffering=1)
    emit = Emitter(stream)
    try:
        spec = TrialSpec.from_json_dict(json.load(sys.stdin))
        run(spec, emit)
    except Exception as exc:  # the manager needs the reason; the exit status marks the failure
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
