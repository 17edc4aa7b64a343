"""What a model asks of a host: memory to hold it, and bytes to read for every generated token.

A model is described either by its GGUF file (``ModelDemand.from_model_info``: the file's own metadata,
read by :func:`tuner.model.gguf_file.inspect_model`) or by explicit parameters for a model that is not
downloaded yet (``ModelDemand.from_parameters``). Both end in the same :class:`ModelDemand`, so the rest
of the sizing engine never cares where the numbers came from.

Memory = weights (the GGUF file; mmap keeps all of it in the page cache) + KV cache (context x parallel
slots x bytes per token) + llama.cpp's compute buffers + an OS reserve + headroom.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.model.gguf_file import ModelInfo
from tuner.roofline import CACHE_TYPE_BYTES as ROOFLINE_CACHE_TYPE_BYTES
from tuner.sizing.assumptions import SizingAssumptions

# Bytes per KV cache element (ggml block sizes: q8_0 = 34 bytes per 32 values, ...): one table, shared with
# the tuner's roofline so a prediction and a measurement count the KV cache the same way.
CACHE_TYPE_BYTES = ROOFLINE_CACHE_TYPE_BYTES

DEFAULT_UBATCH = 512
# When a GGUF has no tokenizer array and the user gives no --vocab: the largest common vocabulary of
# current model families (Gemma 3), so the logits buffer is not underestimated.
FALLBACK_VOCAB = 262_144
# Activation scratch per token of a micro-batch, in units of n_embd float32 values, on top of the logits
# row. Measured on llama.cpp 0c1e570 (llama-cpp-python 0.3.36) with SmolLM2-135M: compute buffer
# 102.5 MiB at n_ubatch 512, of which 96 MiB are logits (512 x 49152 x 4 B); the rest is < 8 x n_embd
# per token. With flash attention on (llama.cpp's CPU default) the buffer does not grow with context.
ACTIVATION_EMBD_MULTIPLE = 8


@dataclass(frozen=True)
class ModelDemand:
    """The figures of a model that decide host size and speed."""

    name: str
    source: str  # "gguf" (read from the file) or "parameters" (given by the user)
    weight_bytes: int  # bytes held in memory: the model file(s)
    streamed_bytes_per_token: int  # weight bytes read to generate one token
    n_params: int
    n_layers: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_embd: int
    n_vocab: int

    def kv_bytes_per_token(self, cache_type: str) -> float:
        """KV cache bytes one token of context costs (all layers, K and V)."""
        per_layer = self.n_head_kv * (self.head_dim_k + self.head_dim_v) * CACHE_TYPE_BYTES[cache_type]
        return self.n_layers * per_layer

    @classmethod
    def from_model_info(cls, info: ModelInfo, *, n_vocab: int | None = None) -> ModelDemand:
        return cls(
            name=info.name,
            source="gguf",
            weight_bytes=info.size_bytes,
            streamed_bytes_per_token=info.bytes_per_token,
            n_params=info.n_params,
            n_layers=info.n_layers,
            n_head_kv=info.n_head_kv,
            head_dim_k=info.head_dim_k,
            head_dim_v=info.head_dim_v,
            n_embd=info.n_embd,
            n_vocab=n_vocab or FALLBACK_VOCAB,
        )

    @classmethod
    def from_parameters(
        cls,
        *,
        params: float,
        bits_per_weight: float,
        layers: int,
        kv_heads: int,
        head_dim: int,
        active_params: float | None = None,
        n_embd: int | None = None,
        n_vocab: int | None = None,
        name: str = "",
    ) -> ModelDemand:
        """A model described by numbers: weights = params x bits / 8; a dense model streams all of them.

        ``active_params`` is for mixture-of-experts models (parameters used per token). Without
        ``n_embd`` the embedding width is estimated from params ~ 12 x layers x n_embd^2, which only
        feeds the small compute-buffer term.
        """
        problems = []
        for label, value in (("params", params), ("bits per weight", bits_per_weight), ("layers", layers),
                             ("KV heads", kv_heads), ("head dim", head_dim)):
            if not value or value <= 0:
                problems.append(f"{label} must be positive (got {value})")
        if bits_per_weight and not 1 <= bits_per_weight <= 32:
            problems.append(f"bits per weight {bits_per_weight} is outside 1..32")
        active = params if active_params is None else active_params
        if active is not None and params and not 0 < active <= params:
            problems.append(f"active params {active_params} must be positive and at most params {params}")
        if problems:
            raise UserError("invalid model parameters: " + "; ".join(problems),
                            "give --params, --bits, --layers, --kv-heads and --head-dim as positive numbers "
                            "(e.g. --params 70.6e9 --bits 4.85 --layers 80 --kv-heads 8 --head-dim 128)")
        embd = n_embd or max(1, round(math.sqrt(params / (12 * layers))))
        return cls(
            name=name or f"{params / 1e9:.1f}B at {bits_per_weight:g} bits/weight",
            source="parameters",
            weight_bytes=math.ceil(params * bits_per_weight / 8),
            streamed_bytes_per_token=math.ceil(active * bits_per_weight / 8),
            n_params=int(params),
            n_layers=layers,
            n_head_kv=kv_heads,
            head_dim_k=head_dim,
            head_dim_v=head_dim,
            n_embd=embd,
            n_vocab=n_vocab or FALLBACK_VOCAB,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """How the server will run the model: tokens of context per slot, slots, and KV cache type.

    llama-server's ``--ctx-size`` is the total over all slots, i.e. ``context x parallel``.
    """

    context: int = 8192
    parallel: int = 1
    cache_type: str = "f16"
    ubatch: int = DEFAULT_UBATCH

    def validate(self) -> Workload:
        problems = []
        if self.context < 1:
            problems.append(f"context {self.context} must be at least 1 token")
        if self.parallel < 1:
            problems.append(f"parallel {self.parallel} must be at least 1 slot")
        if self.cache_type not in CACHE_TYPE_BYTES:
            problems.append(f"cache type {self.cache_type!r} is not one of {', '.join(CACHE_TYPE_BYTES)}")
        if self.ubatch < 1:
            problems.append("ubatch must be at least 1")
        if problems:
            raise UserError("invalid workload: " + "; ".join(problems),
                            "use e.g. --context 8192 --parallel 1 --cache-type f16")
        return self

    @property
    def total_context(self) -> int:
        return self.context * self.parallel

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_context": self.total_context}


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes a host must have for the model and workload, by what they are for."""

    weights: int
    kv_cache: int
    compute: int
    os_reserve: int
    headroom: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.os_reserve + self.headroom

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def compute_buffer_bytes(model: ModelDemand, workload: Workload) -> int:
    """llama.cpp's CPU compute buffer: the logits of one micro-batch plus activation scratch."""
    return 4 * workload.ubatch * (model.n_vocab + ACTIVATION_EMBD_MULTIPLE * model.n_embd)


def memory_budget(model: ModelDemand, workload: Workload, assumptions: SizingAssumptions) -> MemoryBudget:
    kv = math.ceil(model.kv_bytes_per_token(workload.cache_type) * workload.total_context)
    compute = compute_buffer_bytes(model, workload)
    subtotal = model.weight_bytes + kv + compute
    return MemoryBudget(
        weights=model.weight_bytes,
        kv_cache=kv,
        compute=compute,
        os_reserve=assumptions.os_reserve_bytes,
        headroom=math.ceil(subtotal * assumptions.headroom_fraction),
    )


def bytes_read_per_token(model: ModelDemand, workload: Workload) -> float:
    """Bytes one generated token reads: the streamed weights plus the KV cache of its slot.

    A slot's KV cache grows from empty to ``context`` tokens over a generation; at the average fill
    (half the context) each new token reads half of it.
    """
    kv_read = model.kv_bytes_per_token(workload.cache_type) * workload.context / 2
    return model.streamed_bytes_per_token + kv_read


def demand_from_gguf(path: Path | str) -> ModelDemand:
    """Validate a GGUF file and describe what it asks of a host (metadata only; no weights are read)."""
    from tuner.model.gguf_file import inspect_model

    info = inspect_model(path)
    return ModelDemand.from_model_info(info, n_vocab=info.n_vocab or None)
