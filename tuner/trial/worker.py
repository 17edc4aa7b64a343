"""Trial worker: one fresh process per trial, the pyperf manager/worker split.

Run as ``python -m tuner.trial.worker FD``. It reads a :class:`TrialSpec` from stdin, applies CPU
affinity and memory policy, initialises llama.cpp's NUMA mode (possible once per process only, which is
one reason every trial gets a fresh process), loads the model, and measures prompt processing (pp) and
token generation (tg) the way llama-bench does: fixed token sequences decoded through ``llama_decode``,
no sampling, no tokenizer. Results stream back as JSON lines on file descriptor FD.

Any failure ends the process with a non-zero status after an ``error`` event when it can still write
one; the manager turns that (or a silent death such as the OOM killer's SIGKILL) into a failed trial.
"""

from __future__ import annotations

import collections
import ctypes
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tuner.config import RunConfig
from tuner.stats import sampling_should_stop, warmup_is_stable
from tuner.trial.placement import check_memory_policy, current_memory_policy, pin_to_cpus, set_memory_policy
from tuner.trial.protocol import TrialSpec, measures_pp, measures_tg

NUMA_STRATEGIES = {"none": 0, "distribute": 1, "isolate": 2, "numactl": 3}
LOG_TAIL_LINES = 40


class WorkerError(RuntimeError):
    pass


class Emitter:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: str, **payload: Any) -> None:
        self.stream.write(json.dumps({"event": event, **payload}) + "\n")
        self.stream.flush()


class LlamaLog:
    """Keep llama.cpp's log out of the way, but remember its tail for error messages."""

    def __init__(self, llama_cpp: Any) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._partial = ""

        def _callback(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
            if text:
                chunk = self._partial + text.decode("utf-8", "replace")
                *complete, self._partial = chunk.split("\n")
                self.lines.extend(line for line in complete if line.strip())

        self._callback = llama_cpp.llama_log_callback(_callback)  # keep a reference: C holds a pointer
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def tail(self, n: int = 8) -> str:
        return " | ".join(list(self.lines)[-n:])


class Bench:
    """A loaded model and context, with the two measurements llama-bench calls pp and tg."""

    def __init__(self, spec: TrialSpec, config: RunConfig, log: LlamaLog) -> None:
        import llama_cpp as L

        self.L = L
        self.log = log
        model_params = L.llama_model_default_params()
        model_params.load_mode = {
            "auto": L.LLAMA_LOAD_MODE_AUTO, "none": L.LLAMA_LOAD_MODE_NONE, "mmap": L.LLAMA_LOAD_MODE_MMAP,
            "mlock": L.LLAMA_LOAD_MODE_MLOCK, "mmap+mlock": L.LLAMA_LOAD_MODE_MMAP_MLOCK,
        }[config.load_mode]
        self.model = L.llama_model_load_from_file(spec.model_path.encode(), model_params)
        if not self.model:
            raise WorkerError(f"llama.cpp could not load the model: {log.tail()}")
        workload = spec.workload
        ctx_params = L.llama_context_default_params()
        ctx_params.n_ctx = workload.n_ctx()
        ctx_params.n_batch = config.batch_size
        ctx_params.n_ubatch = config.ubatch_size
        ctx_params.n_threads = config.threads
        ctx_params.n_threads_batch = config.threads_batch
        ctx_params.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                      "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[config.flash_attn]
        ctx_params.type_k = self._ggml_type(config.cache_type_k)
        ctx_params.type_v = self._ggml_type(config.cache_type_v)
        ctx_params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise WorkerError(f"llama.cpp could not create a context with this configuration: {log.tail()}")
        self.memory = L.llama_get_memory(self.ctx)
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        rng = random.Random(workload.seed)
        self.prompt = [rng.randrange(n_vocab) for _ in range(workload.pp_tokens)]
        self.generated = [rng.randrange(n_vocab) for _ in range(workload.tg_tokens)]
        self.n_batch = config.batch_size
        self.depth = 0

    def _ggml_type(self, name: str) -> int:
        value = getattr(self.L, f"GGML_TYPE_{name.upper()}", None)
        if value is None:
            raise WorkerError(f"this llama.cpp build has no KV cache type {name!r}")
        return int(value)

    def _decode(self, tokens: list[int]) -> None:
        array = (self.L.llama_token * len(tokens))(*tokens)
        rc = self.L.llama_decode(self.ctx, self.L.llama_batch_get_one(array, len(tokens)))
        if rc != 0:
            raise WorkerError(f"llama_decode returned {rc}: {self.log.tail()}")

    def run_pp(self) -> float:
        """Prompt processing from an empty context; leaves the prompt in the cache as tg's context."""
        self.L.llama_memory_clear(self.memory, True)
        start = time.perf_counter()
        for i in range(0, len(self.prompt), self.n_batch):
            self._decode(self.prompt[i:i + self.n_batch])
        self.L.llama_synchronize(self.ctx)
        elapsed = time.perf_counter() - start
        self.depth = len(self.prompt)
        return len(self.prompt) / elapsed

    def run_tg(self) -> float:
        """Token generation after the prompt; the generated tokens are removed again afterwards."""
        if self.depth != len(self.prompt):
            self.run_pp()
        start = time.perf_counter()
        for token in self.generated:
            self._decode([token])
        self.L.llama_synchronize(self.ctx)
        elapsed = time.perf_counter() - start
        if not self.L.llama_memory_seq_rm(self.memory, 0, self.depth, -1):
            raise WorkerError("could not trim the KV cache back to the prompt")
        return len(self.generated) / elapsed

    def system_info(self) -> str:
        return str(self.L.llama_print_system_info().decode("utf-8", "replace")).strip()


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


def measure(spec: TrialSpec, bench: Bench, emit: Callable[..., None]) -> None:
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


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the manager dies (even by SIGKILL), so a killed
    controller never leaves a benchmark running that would disturb the next run's measurements."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


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

    import llama_cpp as L

    log = LlamaLog(L)
    L.llama_backend_init()
    if config.numa != "none":
        L.llama_numa_init(NUMA_STRATEGIES[config.numa])
    started = time.perf_counter()
    bench = Bench(spec, config, log)
    load_seconds = time.perf_counter() - started
    emit("ready", pid=os.getpid(), load_seconds=load_seconds, cpus=list(applied_cpus),
         memory_policy=policy[0], memory_nodes=list(policy[1]), system_info=bench.system_info())
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
