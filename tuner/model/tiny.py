"""A tiny real llama model for tests that run llama.cpp where the default model is too slow.

Under CPU emulation (QEMU TCG) one request to SmolLM2-135M takes minutes. :func:`write_tiny_model` writes a
llama-architecture GGUF of a few MB with seeded random weights and the tokenizer of a real model (every
``tokenizer.*`` field of ``source``, copied byte for byte), so llama.cpp loads, tokenizes and generates with
it exactly as with a real model, only the text is gibberish. The same arguments give the same bytes, so the
file's sha256 is stable (for one numpy version: the weights come from ``numpy.random.default_rng``).

The output projection is tied to the token embedding (no ``output.weight``): llama.cpp's llama loader falls
back to ``token_embd.weight``, as for SmolLM2 itself, and the file is spared n_vocab x n_embd weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tuner.atomic import write_atomic
from tuner.errors import UserError
from tuner.model.gguf_header import ARRAY, STRING, MetadataField, read_header

ARCH = "llama"
# Bumped whenever the bytes written for the same arguments change, so cached copies are not reused.
GENERATOR_VERSION = 1
DEFAULT_CONTEXT_LENGTH = 2048
RMS_NORM_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
WEIGHT_STD = 0.02
TOKENIZER_PREFIX = "tokenizer."
TOKENS_KEY = "tokenizer.ggml.tokens"


def tokenizer_fields(source: Path) -> tuple[list[MetadataField], int]:
    """The ``tokenizer.*`` fields of ``source`` in file order (strings as raw bytes, so copies are exact), and
    its vocabulary size."""
    header = read_header(source, keep_array=lambda key, count: key.startswith(TOKENIZER_PREFIX))
    fields = [field for field in header.fields if field.key.startswith(TOKENIZER_PREFIX)]
    tokens = next((field for field in fields if field.key == TOKENS_KEY), None)
    if tokens is None or tokens.sub_type != STRING or not tokens.value:
        raise UserError(f"{source}: has no tokenizer ({TOKENS_KEY} is missing)",
                        "pass a complete model (the default SmolLM2 model) as the tokenizer source")
    if any(field.sub_type == ARRAY for field in fields):
        raise UserError(f"{source}: a tokenizer field is a nested array, which cannot be copied",
                        "use a source model converted by llama.cpp's convert_hf_to_gguf.py")
    return fields, len(tokens.value)


def _check_shape(n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int, context_length: int) -> None:
    for name, value in (("n_embd", n_embd), ("n_layer", n_layer), ("n_head", n_head), ("n_head_kv", n_head_kv),
                        ("n_ff", n_ff), ("context_length", context_length)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    if (n_embd // n_head) % 2:
        raise ValueError(f"the head size n_embd / n_head ({n_embd // n_head}) must be even (rotary embedding)")


def tensor_shapes(n_vocab: int, *, n_embd: int, n_layer: int, n_head: int, n_head_kv: int,
                  n_ff: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the tiny model, in file order, with its numpy shape (llama.cpp's ``ne`` reversed)."""
    head_dim = n_embd // n_head
    kv_dim = head_dim * n_head_kv
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    for block in range(n_layer):
        prefix = f"blk.{block}."
        shapes |= {
            f"{prefix}attn_norm.weight": (n_embd,),
            f"{prefix}attn_q.weight": (n_embd, n_embd),
            f"{prefix}attn_k.weight": (kv_dim, n_embd),
            f"{prefix}attn_v.weight": (kv_dim, n_embd),
            f"{prefix}attn_output.weight": (n_embd, n_embd),
            f"{prefix}ffn_norm.weight": (n_embd,),
            f"{prefix}ffn_gate.weight": (n_ff, n_embd),
            f"{prefix}ffn_up.weight": (n_ff, n_embd),
            f"{prefix}ffn_down.weight": (n_embd, n_ff),
        }
    return shapes


def write_tiny_model(path: Path, *, source: Path, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                     n_head_kv: int | None = None, n_ff: int = 128, context_length: int = DEFAULT_CONTEXT_LENGTH,
                     seed: int = 0, shards: int = 1) -> Path:
    """Write a tiny llama GGUF with random weights and the tokenizer of ``source`` to ``path`` (atomically).

    Matrices are F16 (normal, std 0.02: logits stay small and finite), norm weights F32 ones. The bytes depend
    only on the arguments and on the source's tokenizer fields. Returns ``path``; with ``shards`` > 1 the model
    is split as gguf-split splits it (``<stem>-00001-of-0000N.gguf`` beside ``path``, the tensors shared out
    evenly) and the first shard's path is returned.
    """
    import gguf

    path = Path(path)
    kv_heads = n_head if n_head_kv is None else n_head_kv
    _check_shape(n_embd, n_layer, n_head, kv_heads, n_ff, context_length)
    fields, n_vocab = tokenizer_fields(Path(source))

    shapes = tensor_shapes(n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=kv_heads, n_ff=n_ff)
    if not 1 <= shards <= len(shapes):
        raise UserError(f"a tiny model of {len(shapes)} tensors cannot be split into {shards} shards",
                        f"pass 1 to {len(shapes)} shards")
    writer = gguf.GGUFWriter(None, ARCH, split_max_tensors=0 if shards == 1 else -(-len(shapes) // shards))
    writer.add_name(f"tiny-llama-random-e{n_embd}-l{n_layer}-s{seed}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    for field in fields:
        writer.add_key_value(field.key, field.value, gguf.GGUFValueType(field.value_type),
                             sub_type=None if field.sub_type is None else gguf.GGUFValueType(field.sub_type))

    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights: F32, as llama.cpp's converter writes them
            tensor: np.ndarray[Any, Any] = np.ones(shape, dtype=np.float32)
        else:
            tensor = (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)
        writer.add_tensor(name, tensor)

    with tempfile.TemporaryDirectory(prefix="tiny-gguf-") as tmp:  # the writer wants a path; stage it here
        staged = Path(tmp) / path.name
        writer.write_header_to_file(path=staged)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        files = writer.format_shard_names(staged)
        writer.close()
        if len(files) != shards:
            raise UserError(f"{len(shapes)} tensors do not split evenly into {shards} shards",
                            "pass a number of shards that divides them evenly")
        for written in files:
            write_atomic(path.with_name(written.name), written.read_bytes(), keep_previous=False)
    return path.with_name(files[0].name)


def tiny_model_name(source_sha256: str, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                    n_head_kv: int | None = None, n_ff: int = 128, context_length: int = DEFAULT_CONTEXT_LENGTH,
                    seed: int = 0) -> str:
    """The cache file name: every argument that changes the bytes, and the tokenizer source's sha256."""
    kv_heads = n_head if n_head_kv is None else n_head_kv
    return (f"tiny-llama-v{GENERATOR_VERSION}-e{n_embd}-l{n_layer}-h{n_head}-kv{kv_heads}-ff{n_ff}"
            f"-c{context_length}-s{seed}-{source_sha256[:16]}.gguf")


def tiny_model(cache_dir: Path, *, source: Path | None = None, n_embd: int = 64, n_layer: int = 2,
               n_head: int = 4, n_head_kv: int | None = None, n_ff: int = 128,
               context_length: int = DEFAULT_CONTEXT_LENGTH, seed: int = 0, shards: int = 1) -> Path:
    """The tiny model under ``cache_dir``, generated on first use (``source`` defaults to the default model);
    with ``shards`` > 1 split like gguf-split, and the path is the first shard's.

    Concurrent callers may both generate it; each replaces the file atomically with the same bytes.
    """
    from tuner.model.checksum import cached_sha256

    if source is None:
        from tuner.model.default_model import default_model_path

        source = default_model_path()
    target = Path(cache_dir) / tiny_model_name(
        cached_sha256(Path(source)), n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        n_ff=n_ff, context_length=context_length, seed=seed)
    names = [f"{target.stem}-{i:05d}-of-{shards:05d}.gguf" for i in range(1, shards + 1)] if shards > 1 else []
    if all(target.with_name(name).is_file() for name in names or [target.name]):
        return target.with_name((names or [target.name])[0])
    return write_tiny_model(target, source=Path(source), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                            n_head_kv=n_head_kv, n_ff=n_ff, context_length=context_length, seed=seed, shards=shards)
