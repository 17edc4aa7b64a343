"""How close token generation is to the memory-bandwidth limit of the host.

Generating one token reads every active weight once, plus the KV cache of the context so far, so
``tg tok/s <= bandwidth / bytes read per token``. The bandwidth is the one measured on the same host
(``llamahost probe``), not a datasheet figure, so the fraction says how much of what this machine can
really deliver llama.cpp gets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tuner.model.gguf_file import ModelInfo

# Bytes per KV cache element for llama.cpp's cache types (block size / bytes per block for quantized ones).
CACHE_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}


@dataclass(frozen=True)
class Roofline:
    bandwidth_gbps: float
    weight_bytes_per_token: float
    kv_bytes_per_token: float
    max_tg_tps: float
    achieved_tg_tps: float

    @property
    def bytes_per_token(self) -> float:
        return self.weight_bytes_per_token + self.kv_bytes_per_token

    @property
    def fraction(self) -> float:
        return self.achieved_tg_tps / self.max_tg_tps if self.max_tg_tps > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_per_token"] = self.bytes_per_token
        out["fraction"] = self.fraction
        return out


def mean_context_depth(pp_tokens: int, tg_tokens: int) -> float:
    """tg is measured after a prompt of ``pp_tokens``; token i of the generation sees pp_tokens + i."""
    return pp_tokens + (tg_tokens - 1) / 2.0


def roofline(bandwidth_gbps: float, model: ModelInfo, achieved_tg_tps: float, *, depth: float,
             cache_type_k: str = "f16", cache_type_v: str = "f16") -> Roofline:
    if bandwidth_gbps <= 0:
        raise ValueError("bandwidth must be positive")
    kv = model.kv_bytes_per_token(CACHE_TYPE_BYTES[cache_type_k], CACHE_TYPE_BYTES[cache_type_v]) * depth
    total = model.bytes_per_token + kv
    return Roofline(
        bandwidth_gbps=bandwidth_gbps,
        weight_bytes_per_token=float(model.bytes_per_token),
        kv_bytes_per_token=kv,
        max_tg_tps=bandwidth_gbps * 1e9 / total,
        achieved_tg_tps=achieved_tg_tps,
    )
