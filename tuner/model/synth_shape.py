"""The shape of a model to synthesize: its tensor table and metadata, worked out without any weights.

``llamahost model synth`` writes a GGUF with a real model's exact shape and random weights, so a host can be
sized and tuned for a 70B-400B model before anyone downloads it. The shape comes from one of three places:

* a GGUF header (:mod:`tuner.model.synth` copies its tensor table as it is: the most faithful);
* a Hugging Face ``config.json`` (:func:`shape_from_hf_config`);
* explicit dimensions (:class:`ModelShape` itself).

For the last two, :func:`plan_tensors` lays out the architecture's tensors as llama.cpp's converter names them
and gives each the type ``llama-quantize`` would (``llama_tensor_get_type`` in llama.cpp's src/llama-quant.cpp:
more bits for attn_v and ffn_down in the layers ``use_more_bits`` picks, Q6_K for the output projection, Q8_0
attention for 8-expert MoE, and the fallbacks for rows that a type's block does not divide). Pure logic: no I/O.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from tuner.errors import UserError

# Hugging Face architecture -> llama.cpp architecture. Mixtral is llama with experts, as llama.cpp loads it.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
}
ARCHITECTURES = tuple(sorted(set(HF_ARCHITECTURES.values())))
# llama-quantize's file types this planner reproduces (gguf.LlamaFileType values).
FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}
# The type most tensors get under each file type.
_BASE_TYPE = {"F16": "F16", "Q4_0": "Q4_0", "Q8_0": "Q8_0", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
# llama-quantize's fallback when a row length is not a multiple of the type's block (tensor_type_fallback).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
SHAPE_FIX = "pass the model's config.json from Hugging Face, or its GGUF header (--like), unchanged"


@functools.cache
def block_size(type_name: str) -> tuple[int, int]:
    """Elements and bytes of one block of ``type_name``, from the gguf package (imported only when a plan
    is laid out: the command line starts without it)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


@dataclass(frozen=True)
class ModelShape:
    """What decides a transformer's tensors. ``n_expert`` 0 is a dense model."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int = 0  # 0: n_embd / n_head
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_expert: int = 0  # the experts' hidden size (0: n_ff)
    context_length: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = False
    name: str = "synthetic"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def expert_ff(self) -> int:
        return self.n_ff_expert or self.n_ff

    def check(self) -> ModelShape:
        """Refuse a shape llama.cpp could not load, naming the dimension and the rule it breaks."""
        if self.arch not in ARCHITECTURES:
            raise UserError(f"architecture '{self.arch}' cannot be synthesized (known: {', '.join(ARCHITECTURES)})",
                            "pass the GGUF header of the model (--like), which works for any architecture")
        for name in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "context_length"):
            if getattr(self, name) <= 0:
                raise UserError(f"the shape's {name} is {getattr(self, name)}: it must be positive", SHAPE_FIX)
        if self.head_dim == 0 and self.n_embd % self.n_head:
            raise UserError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head} and no head_dim is "
                            "given", SHAPE_FIX)
        if self.n_head % self.n_head_kv:
            raise UserError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}", SHAPE_FIX)
        if self.head_size % 2:
            raise UserError(f"the head size {self.head_size} is odd: rotary embeddings need an even one", SHAPE_FIX)
        if self.n_expert and not 0 < self.n_expert_used <= self.n_expert:
            raise UserError(f"{self.n_expert_used} experts used per token of {self.n_expert}: it must be 1 to "
                            f"{self.n_expert}", SHAPE_FIX)
        if self.arch == "llama" and self.n_expert and self.n_ff_expert not in (0, self.n_ff):
            raise UserError(f"llama's experts are as wide as its feed-forward length ({self.n_ff}), not "
                            f"{self.n_ff_expert}", "leave out the expert width (--expert-ff) for a llama MoE")
        if self.arch == "qwen3moe" and not self.n_expert:
            raise UserError("a qwen3moe shape has no experts", "give the number of experts (num_experts)")
        return self


def shape_from_hf_config(config: dict[str, Any], *, name: str = "synthetic") -> ModelShape:
    """The shape a Hugging Face ``config.json`` describes (its ``architectures`` entry picks the layout)."""
    architectures = config.get("architectures") or []
    hf_arch = architectures[0] if architectures else config.get("model_type", "?")
    arch = HF_ARCHITECTURES.get(hf_arch)
    if arch is None:
        raise UserError(f"the config's architecture '{hf_arch}' cannot be synthesized from a config.json "
                        f"(known: {', '.join(sorted(HF_ARCHITECTURES))})",
                        "pass the GGUF header of the model (--like), which works for any architecture llama.cpp "
                        "loads")

    def number(key: str, default: Any = None) -> Any:
        value = config.get(key, default)
        if value is None:
            raise UserError(f"the config.json has no {key}", SHAPE_FIX)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise UserError(f"the config.json's {key} is {value!r}, not a number", SHAPE_FIX)
        return value

    n_head = int(number("num_attention_heads"))
    n_expert = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    moe_ff = int(config.get("moe_intermediate_size") or 0)
    return ModelShape(
        arch=arch,
        n_vocab=int(number("vocab_size")),
        n_embd=int(number("hidden_size")),
        n_layer=int(number("num_hidden_layers")),
        n_head=n_head,
        n_head_kv=int(number("num_key_value_heads", n_head)),
        n_ff=int(number("intermediate_size")),
        head_dim=int(config.get("head_dim") or 0),
        n_expert=n_expert,
        n_expert_used=int(config.get("num_experts_per_tok") or 0) if n_expert else 0,
        n_ff_expert=moe_ff,
        context_length=int(number("max_position_embeddings", 4096)),
        rope_theta=float(number("rope_theta", 10000.0)),
        rms_eps=float(number("rms_norm_eps", 1e-5)),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        name=name,
    ).check()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0], the row length, first
    type_name: str

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        elements, size = block_size(self.type_name)
        return self.n_elements // elements * size


def _layer_tensors(shape: ModelShape, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """One block's tensors as llama.cpp's converter names them, with their ggml shapes."""
    e, q, kv = shape.n_embd, shape.n_head * shape.head_size, shape.n_head_kv * shape.head_size
    p = f"blk.{layer}."
    tensors: list[tuple[str, tuple[int, ...]]] = [(p + "attn_norm.weight", (e,)), (p + "attn_q.weight", (e, q)),
                                                  (p + "attn_k.weight", (e, kv)), (p + "attn_v.weight", (e, kv))]
    if shape.arch == "qwen2":
        tensors += [(p + "attn_q.bias", (q,)), (p + "attn_k.bias", (kv,)), (p + "attn_v.bias", (kv,))]
    if shape.arch in ("qwen3", "qwen3moe"):
        tensors += [(p + "attn_q_norm.weight", (shape.head_size,)), (p + "attn_k_norm.weight", (shape.head_size,))]
    tensors += [(p + "attn_output.weight", (q, e)), (p + "ffn_norm.weight", (e,))]
    if shape.n_expert:
        f, n = shape.expert_ff, shape.n_expert
        tensors += [(p + "ffn_gate_inp.weight", (e, n)), (p + "ffn_gate_exps.weight", (e, f, n)),
                    (p + "ffn_up_exps.weight", (e, f, n)), (p + "ffn_down_exps.weight", (f, e, n))]
    else:
        f = shape.n_ff
        tensors += [(p + "ffn_gate.weight", (e, f)), (p + "ffn_up.weight", (e, f)), (p + "ffn_down.weight", (f, e))]
    return tensors


def use_more_bits(layer: int, n_layers: int) -> bool:
    """The layers llama-quantize gives more bits in its _M mixes: the first and last eighth, every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _quantized(name: str, ne: tuple[int, ...]) -> bool:
    """llama-quantize leaves 1-D tensors, norms and the expert router as they are (F32)."""
    return len(ne) >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp" not in name


def _fits(type_name: str, row: int) -> bool:
    return row % block_size(type_name)[0] == 0


def tensor_type(name: str, ne: tuple[int, ...], shape: ModelShape, file_type: str, layer: int) -> str:
    """The type llama-quantize gives tensor ``name`` under ``file_type`` (its rules for these file types)."""
    if not _quantized(name, ne):
        return "F32"
    base = _BASE_TYPE[file_type]
    if file_type == "F16":
        return "F16"
    chosen = base
    is_output = name == "output.weight" or (name == "token_embd.weight" and shape.tied_embeddings)
    if is_output:
        chosen = "Q8_0" if base == "Q8_0" or not _fits("Q6_K", ne[0]) else "Q6_K"
        return chosen
    more_bits = file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, shape.n_layer)
    if name.endswith("attn_v.weight"):
        if more_bits:
            chosen = "Q6_K"
        if shape.n_layer == 80 and shape.arch in ("llama", "qwen2") and chosen == "Q4_K":  # llama.cpp's 70B type
            chosen = "Q5_K"
        if shape.n_expert == 8:
            chosen = "Q8_0"
    elif name.endswith("attn_k.weight") and shape.n_expert == 8:
        chosen = "Q8_0"
    elif "ffn_down" in name and more_bits:
        chosen = "Q6_K"
    elif name.endswith("attn_output.weight") and shape.n_expert == 8 and file_type == "Q4_K_M":
        chosen = "Q5_K"
    if not _fits(chosen, ne[0]):
        fallback = _FALLBACK.get(chosen)
        if fallback is None:
            raise UserError(f"tensor {name}: its rows of {ne[0]} do not divide into {chosen} blocks of "
                            f"{block_size(chosen)[0]}", "pick another file type (--type), as llama-quantize would")
        chosen = fallback if _fits(fallback, ne[0]) else "F16"
    return chosen


def plan_tensors(shape: ModelShape, file_type: str) -> list[PlannedTensor]:
    """Every tensor of ``shape`` quantized as ``file_type``, in the converter's order."""
    if file_type not in FILE_TYPES:
        raise UserError(f"file type '{file_type}' is not one synth reproduces (known: {', '.join(FILE_TYPES)})",
                        "pick one of those, or pass the GGUF header of a model of that type (--like)")
    shape.check()
    named: list[tuple[str, tuple[int, ...], int]] = [("token_embd.weight", (shape.n_embd, shape.n_vocab), 0)]
    for layer in range(shape.n_layer):
        named += [(name, ne, layer) for name, ne in _layer_tensors(shape, layer)]
    named.append(("output_norm.weight", (shape.n_embd,), 0))
    if not shape.tied_embeddings:
        named.append(("output.weight", (shape.n_embd, shape.n_vocab), 0))
    return [PlannedTensor(name, ne, tensor_type(name, ne, shape, file_type, layer)) for name, ne, layer in named]


def shape_metadata(shape: ModelShape, file_type: str) -> dict[str, Any]:
    """The architecture's metadata keys llama.cpp reads for this shape (values typed by :mod:`tuner.model.synth`)."""
    a = shape.arch
    meta: dict[str, Any] = {
        "general.name": shape.name,
        "general.file_type": FILE_TYPES[file_type],
        "general.quantization_version": 2,
        f"{a}.vocab_size": shape.n_vocab,
        f"{a}.context_length": shape.context_length,
        f"{a}.embedding_length": shape.n_embd,
        f"{a}.block_count": shape.n_layer,
        f"{a}.feed_forward_length": shape.n_ff,
        f"{a}.attention.head_count": shape.n_head,
        f"{a}.attention.head_count_kv": shape.n_head_kv,
        f"{a}.attention.key_length": shape.head_size,
        f"{a}.attention.value_length": shape.head_size,
        f"{a}.rope.dimension_count": shape.head_size,
        f"{a}.rope.freq_base": shape.rope_theta,
        f"{a}.attention.layer_norm_rms_epsilon": shape.rms_eps,
    }
    if shape.n_expert:
        meta |= {f"{a}.expert_count": shape.n_expert, f"{a}.expert_used_count": shape.n_expert_used}
        if a == "qwen3moe":
            meta[f"{a}.expert_feed_forward_length"] = shape.expert_ff
    return meta
