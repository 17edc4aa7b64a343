"""The search space of a live server: the benchmark space plus what only a serving process has.

A live server processes prompts and generates at once, so both thread counts and the batch sizes matter
(the benchmark space with the ``both`` objective). On top of that come the server's slots
(``--parallel``; ``-1`` is llama-server's automatic choice: 4 slots sharing one KV cache) and continuous
batching (only meaningful with more than one slot, so only searched then).

The context is not searched: it is a promise to the deployment's users, not a speed knob. Every slot gets at
least the context the workload's longest request needs and at least the share each slot had on the deployment
(its context over its slots; a context of 0 is the model's trained context), and the whole context never falls
below the deployed one. So a winner written back never shortens what the deployment served: a deployment with
16M tokens of context over 4 slots keeps 16M with 4 or fewer slots and gets 4M per slot with more. A slot count
whose context would need more memory than the deployed one is offered only when its KV cache fits beside the
model (KV_MEMORY_SHARE of RAM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from tuner.build_knobs import BuildKnobs
from tuner.config import MAX_CTX_SIZE, RunConfig, slots_of
from tuner.model.gguf_file import ModelInfo
from tuner.probe.host import HostProbe
from tuner.space import UBATCH_LOG2, SearchSpace, TrialLike

# No more slots than the smallest batch the space draws: llama-server aborts at start with a batch below its
# slots, so RunConfig refuses such a pair (least_batch_size) and draw() would fail on it.
MAX_SLOTS = 2 ** UBATCH_LOG2[0]
# The share of RAM the model and a candidate's KV cache may take together (the rest: the OS, the server's
# buffers, page cache for everything else).
KV_MEMORY_SHARE = 0.9


def slot_choices(concurrency: int) -> tuple[int, ...]:
    """Slot counts worth trying for a client concurrency: powers of two up to twice the concurrency (at most
    MAX_SLOTS), plus llama-server's automatic setting."""
    choices = [1]
    while choices[-1] < 2 * concurrency and choices[-1] < MAX_SLOTS:
        choices.append(choices[-1] * 2)
    return (-1, *choices)


class LiveSearchSpace(SearchSpace):
    def __init__(self, probe: HostProbe, model: ModelInfo, *, concurrency: int, ctx_per_slot: int,
                 baseline: RunConfig | None = None, search_kv_cache: bool = True,
                 usable_cpus: Iterable[int] | None = None, numa_blocked: str | None = None,
                 knobs: BuildKnobs | None = None) -> None:
        super().__init__(probe, model, "both", search_kv_cache=search_kv_cache, usable_cpus=usable_cpus,
                         numa_blocked=numa_blocked, knobs=knobs)
        self.concurrency = concurrency
        self.deployed_ctx_size = deployed_ctx_size(baseline, model)
        self.ctx_per_slot = max(ctx_per_slot, self.deployed_ctx_size // slots_of(baseline.parallel)
                                if baseline is not None else 0)
        self._deployed = baseline
        self.slots = tuple(slots for slots in slot_choices(concurrency) if self._kv_cache_fits(slots)) or (1,)

    def ctx_size_for(self, parallel: int) -> int:
        """The context a configuration with ``parallel`` slots runs with (see the module's docstring)."""
        return min(MAX_CTX_SIZE, max(self.ctx_per_slot * slots_of(parallel), self.deployed_ctx_size))

    def _kv_cache_fits(self, parallel: int) -> bool:
        """Whether a slot count's context is worth a trial: no larger than the deployed one (it costs no more
        memory than what serves now), or its f16 KV cache fits beside the model in KV_MEMORY_SHARE of RAM. A
        deployment with a long context would otherwise draw slot counts whose KV cache cannot be allocated
        (32 slots x 32K tokens of a 70B is 335 GB), each a failed trial."""
        ctx = self.ctx_size_for(parallel)
        if self.deployed_ctx_size and ctx <= self.deployed_ctx_size:
            return True
        kv_bytes = ctx * self.model.kv_bytes_per_token()
        return kv_bytes + self.model.size_bytes <= KV_MEMORY_SHARE * self.probe.memory_total_bytes

    def draw(self, trial: TrialLike) -> RunConfig:
        config = super().draw(trial)
        parallel = int(trial.suggest_categorical("parallel", self.slots))
        cont_batching = bool(trial.suggest_categorical("cont_batching", (True, False))) \
            if slots_of(parallel) > 1 else True
        return dataclasses.replace(config, parallel=parallel, cont_batching=cont_batching,
                                   ctx_size=self.ctx_size_for(parallel)).validate()

    def _baseline_value(self, name: str) -> Any:
        if name == "parallel":
            return -1  # llama-server's default is automatic slots
        if name == "cont_batching":
            return True
        return super()._baseline_value(name)

    def _unsearched(self, name: str) -> Any:
        """A build-dependent setting this build does not offer keeps the deployed value."""
        if self._deployed is not None:
            return getattr(self._deployed, name)
        return super()._unsearched(name)

    def baseline(self) -> RunConfig:
        """The deployed configuration when one was given, else llama-server's defaults."""
        if self._deployed is not None:
            return dataclasses.replace(self._deployed, ctx_size=self.ctx_size_for(self._deployed.parallel))
        return self.config_from_params({})

    def baseline_params(self) -> dict[str, Any]:
        """Parameters reproducing the baseline, or ``{}`` when the deployed configuration is not a point of
        this space (e.g. a hand-written CPU list): then it is measured as a fixed trial."""
        if self._deployed is None:
            return super().baseline_params()
        params = params_for(self, self.baseline())
        return params if params is not None else {}


def deployed_ctx_size(deployed: RunConfig | None, model: ModelInfo) -> int:
    """The context the deployment serves with (its 0 is the model's trained context); 0 when none is given."""
    if deployed is None:
        return 0
    return deployed.ctx_size if deployed.ctx_size > 0 else model.context_length


def params_for(space: SearchSpace, config: RunConfig) -> dict[str, Any] | None:
    """The space's parameters that rebuild ``config`` exactly, or None if no point of the space does."""
    params: dict[str, Any] = {
        "numa": config.numa, "placement": config.placement, "smt": config.smt, "threads": config.threads,
        "threads_batch": config.threads_batch, "ubatch_log2": config.ubatch_size.bit_length() - 1,
        "batch_log2": config.batch_size.bit_length() - 1, "memory_policy": config.memory_policy,
        "load_mode": config.load_mode, "flash_attn": config.flash_attn, "cache_type_k": config.cache_type_k,
        "cache_type_v": config.cache_type_v, "parallel": config.parallel, "cont_batching": config.cont_batching,
        "repack": config.repack, "omp_wait_policy": config.omp_wait_policy, "cpu_strict": config.cpu_strict,
    }
    try:
        rebuilt = space.config_from_params(params)
    except ValueError:
        return None
    return params if rebuilt == config else None
