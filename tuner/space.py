"""The search space, derived from the host probe, the model and the objective.

Dimensions that cannot matter are not searched, so the sampler spends its trials where they can pay:

* SMT only on hosts with SMT siblings, and only when threads are pinned (unpinned threads land anywhere);
* compact vs. scatter placement only with more than one cache or NUMA domain;
* NUMA mode and memory policy only with more than one NUMA node;
* generation threads only when tg is measured, batch threads and batch sizes only when pp is;
* mlock only when this process may lock the whole model in memory;
* the OpenMP wait policy, weight repacking and strict placement only when the build that will serve offers
  them (:mod:`tuner.build_knobs`, read from the binary), strict placement only for pinned configurations.

Invalid combinations are excluded by construction, never scored: the CPU mask is chosen for the larger of
the two thread counts, ``n_ubatch <= n_batch`` holds by the order of sampling, a quantized V cache is only
offered with flash attention on or auto, and ``--numa distribute|isolate`` (where llama.cpp pins threads
itself) never comes with a CPU list.

One function, :meth:`SearchSpace.draw`, maps choices to a :class:`RunConfig`; it is driven either by an
Optuna trial (``suggest_*``) or by a stored parameter dict, so a configuration is rebuilt exactly as it
was measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tuner.build_knobs import BuildKnobs
from tuner.config import (
    MAX_MASK_CPU,
    MEMORY_POLICIES,
    NUMA_MODES,
    OMP_WAIT_POLICIES,
    MemoryPolicy,
    NumaMode,
    OmpWaitPolicy,
    Placement,
    RunConfig,
)
from tuner.errors import UserError
from tuner.model.gguf_file import ModelInfo
from tuner.probe.host import HostProbe
from tuner.probe.placement import max_threads, select_cpus
from tuner.trial.protocol import measures_pp, measures_tg

UBATCH_LOG2 = (5, 10)  # 32 .. 1024
BATCH_LOG2_MAX = 12  # 4096
DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512
KV_TYPES = ("f16", "q8_0")
KV_QUANT_BLOCK = 32  # values per q8_0 block (ggml's QK8_0)


class TrialLike(Protocol):
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class Dimension:
    """One knob, whether it is searched on this host, and why - shown to the user before tuning."""

    name: str
    searched: bool
    values: str
    reason: str


class SearchSpace:
    """Every choice a trial makes, on the CPUs the trials may use.

    ``usable_cpus``: the CPUs a trial process can run on (this process' affinity within its cgroup cpuset).
    Candidates are drawn inside them only: on a host whose cpu role confines user.slice to the housekeeping
    CPUs, a pinned candidate outside them would be clamped by the kernel and measure something else.
    """

    def __init__(self, probe: HostProbe, model: ModelInfo, objective: str, *, search_kv_cache: bool = True,
                 usable_cpus: Iterable[int] | None = None, numa_blocked: str | None = None,
                 knobs: BuildKnobs | None = None) -> None:
        self.probe = probe
        self.knobs = knobs if knobs is not None else BuildKnobs()
        self.model = model
        self.objective = objective
        usable = None if usable_cpus is None else sorted(set(usable_cpus))
        self.topology = probe.topology if usable is None else probe.topology.restricted_to(usable)
        if not self.topology.cpus:
            raise UserError(f"none of this host's online CPUs {list(probe.topology.logical_cpus)} may be used by "
                            f"this process (it may use {usable})",
                            "run the tuner where it may use the inference CPUs (e.g. systemd-run --slice of the "
                            "server's slice), or widen its CPU affinity")
        topo = self.topology
        self.physical_cores = topo.physical_core_count
        self.logical_cpus = len(topo.cpus)
        self.multi_node = len(topo.nodes) > 1
        # Where the model's pages cannot be put back between trials (tuner.model_pages), NUMA trials would
        # measure the placement another process gave them: NUMA mode and memory policy are left out.
        self.numa_blocked = numa_blocked if self.multi_node else None
        self.search_numa = self.multi_node and self.numa_blocked is None
        self.multi_domain = len(topo.llc_domains) > 1 or self.multi_node
        self.has_smt = topo.has_smt
        self.search_tg_threads = measures_tg(objective)
        self.search_batch = measures_pp(objective)
        self.can_mlock = probe.kernel.can_lock_memory or (
            probe.kernel.memlock_limit_bytes is not None and probe.kernel.memlock_limit_bytes >= model.size_bytes
        )
        # llama.cpp refuses a q8_0 KV cache whose head size is not a whole number of q8_0 blocks (32 values):
        # such a trial could only fail, so the dimension is left out, with the reason.
        whole_blocks = model.head_dim_k % KV_QUANT_BLOCK == 0 and model.head_dim_v % KV_QUANT_BLOCK == 0
        self.kv_blocked = None if whole_blocks else (
            f"head size {model.head_dim_k}/{model.head_dim_v} is not a multiple of q8_0's {KV_QUANT_BLOCK}-value "
            "block: llama.cpp refuses a quantized KV cache for this model")
        self.search_kv_cache = search_kv_cache and self.kv_blocked is None
        self.placements = ("os", "compact", "scatter") if self.multi_domain else ("os", "compact")
        self.load_modes = ("auto", "none", "mlock", "mmap+mlock") if self.can_mlock else ("auto", "none")

    # ---- the one mapping from choices to a configuration --------------------------------------------

    def draw(self, trial: TrialLike) -> RunConfig:
        topo = self.topology
        numa: NumaMode = trial.suggest_categorical("numa", NUMA_MODES) if self.search_numa else "none"
        threads_pinned = numa in ("none", "numactl")
        placement: Placement = trial.suggest_categorical("placement", self.placements) if threads_pinned else "os"
        pinned = placement != "os"
        smt = bool(trial.suggest_categorical("smt", (False, True))) if (pinned and self.has_smt) else self.has_smt
        limit = max_threads(topo, smt) if pinned else self.logical_cpus
        threads = trial.suggest_int("threads", 1, limit) if self.search_tg_threads else min(
            self.physical_cores, limit)
        threads_batch = trial.suggest_int("threads_batch", 1, limit) if self.search_batch else threads
        if self.search_batch:
            ubatch_log2 = trial.suggest_int("ubatch_log2", *UBATCH_LOG2)
            batch_log2 = trial.suggest_int("batch_log2", ubatch_log2, BATCH_LOG2_MAX)
            ubatch, batch = 2**ubatch_log2, 2**batch_log2
        else:
            ubatch, batch = DEFAULT_UBATCH, DEFAULT_BATCH
        cpus = select_cpus(topo, max(threads, threads_batch), smt=smt, placement=placement) \
            if placement != "os" else ()
        memory_policy: MemoryPolicy = trial.suggest_categorical("memory_policy", MEMORY_POLICIES) \
            if (self.search_numa and threads_pinned) else "default"
        memory_nodes = (topo.nodes_of(cpus) if cpus else topo.node_ids) if memory_policy != "default" else ()
        load_mode = trial.suggest_categorical("load_mode", self.load_modes)
        flash_attn = trial.suggest_categorical("flash_attn", ("auto", "on", "off"))
        if self.search_kv_cache:
            cache_k = trial.suggest_categorical("cache_type_k", KV_TYPES)
            cache_v = trial.suggest_categorical("cache_type_v", KV_TYPES) if flash_attn != "off" else "f16"
        else:
            cache_k = cache_v = "f16"
        repack = bool(trial.suggest_categorical("repack", (True, False))) if self.knobs.repack \
            else bool(self._unsearched("repack"))
        omp_wait_policy: OmpWaitPolicy = trial.suggest_categorical("omp_wait_policy", OMP_WAIT_POLICIES) \
            if self.knobs.omp_wait_policy else self._unsearched("omp_wait_policy")
        maskable = bool(cpus) and max(cpus) <= MAX_MASK_CPU
        cpu_strict = bool(trial.suggest_categorical("cpu_strict", (False, True))) \
            if (self.knobs.cpu_strict and maskable) else bool(self._unsearched("cpu_strict")) and maskable
        return RunConfig(
            threads=threads, threads_batch=threads_batch, batch_size=batch, ubatch_size=ubatch, smt=smt,
            placement=placement, cpus=tuple(cpus), numa=numa, memory_policy=memory_policy,
            memory_nodes=tuple(memory_nodes), load_mode=load_mode, flash_attn=flash_attn,
            cache_type_k=cache_k, cache_type_v=cache_v, repack=repack, omp_wait_policy=omp_wait_policy,
            cpu_strict=cpu_strict,
        ).validate()

    def config_from_params(self, params: dict[str, Any]) -> RunConfig:
        """Rebuild the configuration a stored trial measured."""
        return self.draw(_Recorder(self._value_in(params)))

    # ---- the baseline: what llama.cpp does when nobody tunes it ------------------------------------

    def _baseline_value(self, name: str) -> Any:
        """llama-server's defaults (common/common.h of the pinned llama.cpp): threads = physical cores
        (``cpu_get_num_math``), the same for batch threads, batch 2048, ubatch 512, flash attention auto,
        load mode auto (mmap on a CPU-only build), f16 KV cache, no NUMA mode, no pinning."""
        return {
            "numa": "none", "placement": "os", "smt": self.has_smt, "threads": self.physical_cores,
            "threads_batch": self.physical_cores, "ubatch_log2": 9, "batch_log2": 11,
            "memory_policy": "default", "load_mode": "auto", "flash_attn": "auto",
            "cache_type_k": "f16", "cache_type_v": "f16", "repack": True, "omp_wait_policy": "default",
            "cpu_strict": False,
        }[name]

    def _value_in(self, params: dict[str, Any]) -> Callable[[str], Any]:
        """A knob's value in ``params``, or the baseline's where ``params`` does not name it."""
        return lambda name: params[name] if name in params else self._baseline_value(name)

    def _unsearched(self, name: str) -> Any:
        """The value of a build-dependent setting this build does not offer: what the baseline runs."""
        return self._baseline_value(name)

    def baseline(self) -> RunConfig:
        return self.config_from_params({})

    def baseline_params(self) -> dict[str, Any]:
        """The Optuna parameters that reproduce the baseline, for ``enqueue_trial``."""
        recorder = _Recorder(self._baseline_value)
        self.draw(recorder)
        return recorder.params

    def neighbours(self, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The configurations one step from ``params``: one searched knob moved to another of its values (an
        integer by one or two), as (key, the parameters its draw takes), distinct and other than ``params``'s.

        A step that brings a knob in (flash attention on brings in the V cache type) starts that knob at the
        baseline's value; a knob the step makes moot is dropped. The search measures such a neighbour when the
        sampler proposes a configuration it has already measured (:class:`tuner.study.RepeatPolicy`)."""
        origin = _Recorder(self._value_in(params))
        seen = {self.draw(origin).key()}
        found: list[tuple[str, dict[str, Any]]] = []
        for name, steps in origin.steps.items():
            for step in steps:
                recorder = _Recorder(self._value_in({**origin.params, name: step}))
                try:
                    key = self.draw(recorder).key()
                except (ValueError, UserError):
                    continue  # a combination the space does not offer
                if key not in seen:
                    seen.add(key)
                    found.append((key, recorder.params))
        return found

    # ---- what the user sees ------------------------------------------------------------------------

    def _numa_reason(self) -> str:
        if not self.multi_node:
            return "one NUMA node: nothing to place"
        return f"not searched: {self.numa_blocked}" if self.numa_blocked else f"{len(self.topology.nodes)} NUMA nodes"

    def dimensions(self) -> list[Dimension]:
        topo = self.topology
        dims = [
            Dimension("numa", self.search_numa, "none, distribute, isolate, numactl", self._numa_reason()),
            Dimension("placement", True, ", ".join(self.placements),
                      "several cache/NUMA domains" if self.multi_domain else "one cache domain: compact = scatter"),
            Dimension("smt", self.has_smt, "off, on",
                      f"{topo.threads_per_core} threads per core" if self.has_smt else "no SMT siblings"),
            Dimension("threads", self.search_tg_threads, f"1..{self.logical_cpus}",
                      "tg is measured" if self.search_tg_threads else "only pp is measured: generation threads idle"),
            Dimension("threads_batch", self.search_batch, f"1..{self.logical_cpus}",
                      "pp is measured" if self.search_batch else "only tg is measured: batch threads idle"),
            Dimension("batch/ubatch", self.search_batch, f"{2**UBATCH_LOG2[0]}..{2**BATCH_LOG2_MAX}",
                      "pp is measured" if self.search_batch else "tg decodes one token at a time"),
            Dimension("memory_policy", self.search_numa, "default, interleave, bind", self._numa_reason()),
            Dimension("load_mode", True, ", ".join(self.load_modes),
                      "mlock allowed" if self.can_mlock else "memlock limit too small for this model: no mlock"),
            Dimension("flash_attn", True, "auto, on, off", "changes the attention kernels"),
            Dimension("kv cache type", self.search_kv_cache, ", ".join(KV_TYPES),
                      "smaller KV reads per token" if self.search_kv_cache else
                      f"pinned to f16 ({self.kv_blocked or '--no-kv-quant'})"),
            Dimension("repack", self.knobs.repack, "on, off", self.knobs.repack_reason),
            Dimension("omp_wait_policy", self.knobs.omp_wait_policy, ", ".join(OMP_WAIT_POLICIES),
                      self.knobs.omp_reason),
            Dimension("cpu_strict", self.knobs.cpu_strict, "off, on (pinned only)", self.knobs.cpu_strict_reason),
        ]
        return dims


class _Recorder:
    """Answers :meth:`SearchSpace.draw`'s ``suggest_*`` calls from ``value`` (an integer clamped into range; a
    choice that is not offered is refused), recording which parameters the draw touched and, for each, the values
    one step away (another choice; an integer one or two steps up or down, in range)."""

    def __init__(self, value: Callable[[str], Any]) -> None:
        self.value = value
        self.params: dict[str, Any] = {}
        self.steps: dict[str, list[Any]] = {}

    def suggest_int(self, name: str, low: int, high: int) -> int:
        value = min(max(int(self.value(name)), low), high)
        self.params[name] = value
        self.steps[name] = [v for v in (value - 1, value + 1, value - 2, value + 2) if low <= v <= high]
        return value

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        value = self.value(name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
        self.params[name] = value
        self.steps[name] = [c for c in choices if c != value]
        return value
