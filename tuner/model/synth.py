"""Write a GGUF with a real model's exact shape and random weights: ``llamahost model synth``.

Token generation on a CPU reads every weight once per token, so its speed depends on the bytes of each
tensor, their types (which kernels run) and the architecture, never on the values. A file with the real
tensor table, the real types and random bytes therefore runs at the real model's speed, and a 405B model can be
sized and tuned for on a host before 230 GB are downloaded.

Random bytes are not enough on their own: a block's fp16 scales could come out as NaN or infinity and poison
every activation. Each quantized block gets small finite scales (the byte offsets per type are in
``_SCALE_FIELDS``, checked against gguf-py's dequantizers by the tests); the quantized values stay random.
Norm weights are ones, as a converter writes them untrained. The data is a pool of random blocks per type,
written over and over: generating 230 GB of fresh randomness would take longer than the download.

The file says what it is: ``llamahost.synthetic`` is true, its ``general.name`` ends in "(synthetic)", and the
tuner's results and reports carry that on (:attr:`tuner.model.gguf_file.ModelInfo.synthetic`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tuner.atomic import atomic_writer
from tuner.errors import UserError
from tuner.model.gguf_file import SYNTHETIC_KEY, shard_paths
from tuner.model.gguf_header import ARRAY, STRING, GGUFHeader, corrupt, read_header
from tuner.model.synth_shape import ModelShape, PlannedTensor, block_size, plan_tensors, shape_metadata
from tuner.model.tiny import tokenizer_fields

SOURCE_KEY = "llamahost.synthetic.source"
NAME_SUFFIX = " (synthetic)"
DEFAULT_ALIGNMENT = 32
POOL_BYTES = 8 << 20
SCALE = 2.0**-9  # a block scale: random quants times this stay in the range of trained weights
FINE_SCALE = 2.0**-14  # for types whose quants are multiplied by a sub-block scale too (up to 63, or 127)
WEIGHT_STD = 0.02
# GGUF value types (gguf.GGUFValueType) for the metadata synth writes itself.
_UINT32, _FLOAT32, _BOOL = 4, 6, 7
# Byte offset of each fp16 scale in a block, and the value it gets: weights stay below 0.25 in magnitude, and
# mins and offsets keep them centred.
_SCALE_FIELDS: dict[str, tuple[tuple[int, float], ...]] = {
    "Q4_0": ((0, SCALE),),
    "Q4_1": ((0, SCALE), (2, -8 * SCALE)),
    "Q5_0": ((0, SCALE),),
    "Q5_1": ((0, SCALE), (2, -16 * SCALE)),
    "Q8_0": ((0, SCALE / 8),),
    "Q2_K": ((80, SCALE), (82, SCALE)),
    "Q3_K": ((108, SCALE),),
    "Q4_K": ((0, FINE_SCALE), (2, FINE_SCALE)),
    "Q5_K": ((0, FINE_SCALE), (2, FINE_SCALE)),
    "Q6_K": ((208, FINE_SCALE),),
}
FILLABLE_TYPES = ("F32", "F16", "BF16", *_SCALE_FIELDS)
# Keys not copied from a source header: the writer's own, a split's, and an earlier synth's.
_NOT_COPIED = ("general.architecture", "general.alignment", "split.", "llamahost.")


@dataclass(frozen=True)
class MetadataEntry:
    key: str
    value: Any
    value_type: int
    sub_type: int | None = None


@dataclass(frozen=True)
class SynthPlan:
    """Everything a synthetic file holds except the random bytes."""

    arch: str
    metadata: tuple[MetadataEntry, ...]
    tensors: tuple[PlannedTensor, ...]
    source: str
    alignment: int = DEFAULT_ALIGNMENT

    @property
    def data_bytes(self) -> int:
        return sum(_padded(tensor.n_bytes, self.alignment) for tensor in self.tensors)

    def check_fillable(self) -> SynthPlan:
        for tensor in self.tensors:
            if tensor.type_name not in FILLABLE_TYPES:
                raise UserError(f"tensor {tensor.name} is {tensor.type_name}, a type synth cannot fill yet "
                                f"(it fills {', '.join(FILLABLE_TYPES)})",
                                "synthesize the same model in a K-quant or legacy type (for example --type "
                                "Q4_K_M with --hf-config)")
        return self


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _synthetic_name(name: str) -> str:
    return name if name.endswith(NAME_SUFFIX) else name + NAME_SUFFIX


# ---- plans ------------------------------------------------------------------------------------------------

def plan_from_header(path: Path) -> SynthPlan:
    """The plan of the model whose GGUF header ``path`` holds: its tensor table and metadata as they are.

    Only the header is read, so the first megabytes of a download do (``curl -r 0-67108863``); a split
    model needs that much of every shard, named as gguf-split names them."""
    path = Path(path).expanduser()
    first = read_header(path, keep_array=lambda key, count: True, check_data=False)
    headers: list[GGUFHeader] = [first]
    split_count = first.value("split.count")
    if isinstance(split_count, int) and split_count > 1:
        for number, shard in enumerate(shard_paths(path, split_count)[1:], start=2):
            if not shard.exists():
                raise UserError(f"{shard}: shard {number} of {split_count} is missing",
                                "put at least the first megabytes of every shard beside the first (synth reads "
                                "only their headers)")
            headers.append(read_header(shard, check_data=False))
    arch = first.value("general.architecture")
    if not arch:
        raise corrupt(path, "GGUF metadata has no general.architecture: not a llama.cpp language model",
                      "pass the header of a model converted by llama.cpp's convert_hf_to_gguf.py")
    metadata = []
    for field in first.fields:
        if field.key.startswith(_NOT_COPIED):
            continue
        if field.value is None or (field.value_type == ARRAY and field.sub_type == ARRAY):
            raise UserError(f"{path}: metadata key {field.key} cannot be copied (a nested array or an oversized "
                            "string)", "pass the header of a model converted by llama.cpp's convert_hf_to_gguf.py")
        value = field.value
        if field.key == "general.name":
            value = _synthetic_name(value.decode("utf-8", errors="replace")).encode()
        metadata.append(MetadataEntry(field.key, value, field.value_type, field.sub_type))
    if first.field("general.name") is None:
        metadata.append(MetadataEntry("general.name", _synthetic_name(path.stem).encode(), STRING))
    alignment = first.value("general.alignment")
    tensors = tuple(PlannedTensor(t.name, t.shape, t.type_name) for header in headers for t in header.tensors)
    return SynthPlan(str(arch), (*metadata, *_marker(str(path))), tensors, source=str(path),
                     alignment=alignment if isinstance(alignment, int) else DEFAULT_ALIGNMENT).check_fillable()


def plan_from_shape(shape: ModelShape, file_type: str, *, tokenizer: Path) -> SynthPlan:
    """The plan of a model of ``shape`` quantized as ``file_type``, speaking ``tokenizer``'s vocabulary (a
    small real GGUF's), padded with unused tokens up to the shape's vocabulary size."""
    tensors = tuple(plan_tensors(shape, file_type))
    metadata = [_typed(key, value) for key, value in shape_metadata(shape, file_type).items() if key != "general.name"]
    metadata.append(MetadataEntry("general.name", _synthetic_name(shape.name).encode(), STRING))
    metadata += _padded_tokenizer(Path(tokenizer), shape.n_vocab)
    source = f"{shape.arch} shape ({shape.n_layer} layers, {shape.n_embd} wide), {file_type}"
    return SynthPlan(shape.arch, (*metadata, *_marker(source)), tensors, source=source).check_fillable()


def _marker(source: str) -> tuple[MetadataEntry, ...]:
    return (MetadataEntry(SYNTHETIC_KEY, True, _BOOL), MetadataEntry(SOURCE_KEY, source.encode(), STRING))


def _typed(key: str, value: Any) -> MetadataEntry:
    if isinstance(value, bool):
        return MetadataEntry(key, value, _BOOL)
    if isinstance(value, int):
        return MetadataEntry(key, value, _UINT32)
    if isinstance(value, float):
        return MetadataEntry(key, value, _FLOAT32)
    return MetadataEntry(key, str(value).encode(), STRING)


def _padded_tokenizer(source: Path, n_vocab: int) -> list[MetadataEntry]:
    """``source``'s tokenizer fields, the per-token arrays padded to ``n_vocab`` with unused tokens: the
    embedding and output tensors keep the real model's size, and text tokenizes as the source's would."""
    fields, source_vocab = tokenizer_fields(source)
    if n_vocab < source_vocab:
        raise UserError(f"the shape's vocabulary ({n_vocab} tokens) is smaller than the tokenizer's ({source_vocab})",
                        "pass a tokenizer model with a smaller vocabulary (--tokenizer), or the model's own GGUF "
                        "header (--like), which carries its tokenizer")
    extra = n_vocab - source_vocab
    padding: dict[str, list[Any]] = {
        "tokenizer.ggml.tokens": [f"<|synth_unused_{i}|>".encode() for i in range(extra)],
        "tokenizer.ggml.token_type": [5] * extra,  # llama_token_type UNUSED
        "tokenizer.ggml.scores": [0.0] * extra,
    }
    entries = []
    for field in fields:
        value = field.value
        if field.key in padding and isinstance(value, list) and len(value) == source_vocab:
            value = [*value, *padding[field.key]]
        entries.append(MetadataEntry(field.key, value, field.value_type, field.sub_type))
    return entries


# ---- bytes ------------------------------------------------------------------------------------------------

def block_pool(type_name: str, rng: np.random.Generator, pool_bytes: int = POOL_BYTES) -> bytes:
    """Random blocks of ``type_name`` with finite scales, whole blocks only."""
    block = block_size(type_name)[1]
    count = max(1, pool_bytes // block)
    if type_name in ("F32", "F16", "BF16"):
        values = rng.standard_normal(count, dtype=np.float32) * WEIGHT_STD
        if type_name == "F16":
            return values.astype(np.float16).tobytes()
        if type_name == "BF16":
            return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        return values.tobytes()
    blocks = rng.integers(0, 256, size=(count, block), dtype=np.uint8)
    for offset, value in _SCALE_FIELDS[type_name]:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return blocks.tobytes()


def _write_tensor(handle: BinaryIO, tensor: PlannedTensor, pool: bytes) -> None:
    if tensor.type_name == "F32" and len(tensor.shape) == 1 and tensor.name.endswith("norm.weight"):
        handle.write(np.ones(tensor.n_elements, dtype=np.float32).tobytes())
        return
    full, rest = divmod(tensor.n_bytes, len(pool))
    view = memoryview(pool)
    for _ in range(full):
        handle.write(view)
    handle.write(view[:rest])


def _header_bytes(plan: SynthPlan) -> bytes:
    """The header, metadata and tensor table as gguf-py writes them (staged in a small temporary file)."""
    import gguf

    writer = gguf.GGUFWriter(None, plan.arch)
    if plan.alignment != DEFAULT_ALIGNMENT:
        writer.add_custom_alignment(plan.alignment)
    for entry in plan.metadata:
        writer.add_key_value(entry.key, entry.value, gguf.GGUFValueType(entry.value_type),
                             sub_type=None if entry.sub_type is None else gguf.GGUFValueType(entry.sub_type))
    for tensor in plan.tensors:
        writer.add_tensor_info(tensor.name, tuple(reversed(tensor.shape)), np.dtype(np.float32), tensor.n_bytes,
                               raw_dtype=gguf.GGMLQuantizationType[tensor.type_name])
    with tempfile.TemporaryDirectory(prefix="synth-gguf-") as tmp:
        staged = Path(tmp) / "header.gguf"
        writer.write_header_to_file(path=staged)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return staged.read_bytes()


def _free_bytes(directory: Path) -> int:
    existing = next(parent for parent in (directory, *directory.parents) if parent.exists())
    return shutil.disk_usage(existing).free


def write_synthetic(plan: SynthPlan, target: Path, *, seed: int = 0, force: bool = False,
                    on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``plan`` to ``target`` atomically with random weights; refuse before the first byte when the file
    exists (without ``force``) or the disk cannot hold it."""
    target = Path(target).expanduser()
    if target.exists() and not force:
        raise UserError(f"{target} exists", "pass another path, or --force to replace it")
    header = _header_bytes(plan)
    total = _padded(len(header), plan.alignment) + plan.data_bytes
    free = _free_bytes(target.parent)
    if total > free:
        raise UserError(f"the synthetic model needs {total / 2**30:.1f} GiB but {target.parent} has "
                        f"{free / 2**30:.1f} GiB free", "free space there, or write it to another disk")
    rng = np.random.default_rng(seed)
    pools: dict[str, bytes] = {}
    with atomic_writer(target, keep_previous=False) as handle:
        handle.write(header)
        written = 0
        for tensor in plan.tensors:
            handle.write(bytes(_padded(handle.tell(), plan.alignment) - handle.tell()))
            if tensor.type_name not in pools:
                pools[tensor.type_name] = block_pool(tensor.type_name, rng)
            _write_tensor(handle, tensor, pools[tensor.type_name])
            written += tensor.n_bytes
            if on_progress is not None:
                on_progress(written, plan.data_bytes)
        handle.write(bytes(_padded(handle.tell(), plan.alignment) - handle.tell()))
    return target


def summary(plan: SynthPlan) -> dict[str, Any]:
    """What the plan will write, for the command's output."""
    by_type: dict[str, int] = {}
    for tensor in plan.tensors:
        by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.n_bytes
    return {"architecture": plan.arch, "source": plan.source, "tensors": len(plan.tensors),
            "data_bytes": plan.data_bytes, "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]))}


def tensor_table(tensors: Iterable[Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """Names, shapes and types: what must match between a model and its synthetic twin."""
    return [(tensor.name, tuple(tensor.shape), tensor.type_name) for tensor in tensors]
