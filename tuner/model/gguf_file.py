"""Model intake: validate a GGUF file and read the metadata the tuner and the sizing engine need.

Nothing is handed to llama.cpp before :func:`inspect_model` has accepted it. llama.cpp aborts the whole
process (or worse, reads past a mapping) on a broken file; a tuner that runs overnight must say at once,
in one sentence, which file is wrong and why.

The header is read by :mod:`tuner.model.gguf_header`, which bounds every length by the bytes left in the file
(a hostile file costs neither memory nor time) and checks every tensor's range. Here come the checks of
meaning: an architecture, layers, an embedding size and parameters, and the shards of a split model agreeing
with their names and with each other. Only then is a file "a valid model".
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.model.gguf_header import (
    NOT_A_MODEL_FIX,
    SPLIT_MIXED_FIX,
    GGUFHeader,
    corrupt,
    read_header,
    shard_place_problem,
)

SHARD_PATTERN = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_SHARDS = 65535  # split.count is a uint16 in gguf-split's files
# Per-layer arrays (head counts of some architectures) are kept; a vocabulary is only counted.
MAX_KEPT_ARRAY = 65536
# Set by `llamahost model synth`: random weights in a real model's shape (tuner.model.synth).
SYNTHETIC_KEY = "llamahost.synthetic"


@dataclass(frozen=True)
class ModelInfo:
    """What llamahost needs to know about a model, read from its GGUF header.

    ``bytes_per_token`` is the weight data read from memory to generate one token: every tensor except
    the token-embedding table (only one row is looked up), and for mixture-of-experts models only the
    fraction of expert weights that is active. It is the numerator of the bandwidth roofline.
    """

    path: Path
    files: tuple[Path, ...]
    size_bytes: int
    gguf_version: int
    architecture: str
    name: str
    file_type: str
    dominant_tensor_type: str
    n_params: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    context_length: int
    expert_count: int
    expert_used_count: int
    tensor_bytes: int
    bytes_per_token: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    n_vocab: int = 0  # 0 when the file carries no tokenizer
    synthetic: bool = False  # random weights from `llamahost model synth`: speed is real, the text is not

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_params if self.n_params else 0.0

    def kv_bytes_per_token(self, k_bytes: float = 2.0, v_bytes: float | None = None) -> float:
        """KV cache bytes one token of context costs, at ``k_bytes``/``v_bytes`` per element (f16 = 2)."""
        v = k_bytes if v_bytes is None else v_bytes
        per_layer = self.n_head_kv * (self.head_dim_k * k_bytes + self.head_dim_v * v)
        return self.n_layers * per_layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": [str(p) for p in self.files],
            "size_bytes": self.size_bytes,
            "gguf_version": self.gguf_version,
            "architecture": self.architecture,
            "name": self.name,
            "file_type": self.file_type,
            "dominant_tensor_type": self.dominant_tensor_type,
            "n_params": self.n_params,
            "bits_per_weight": round(self.bits_per_weight, 3),
            "n_layers": self.n_layers,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "head_dim_k": self.head_dim_k,
            "head_dim_v": self.head_dim_v,
            "context_length": self.context_length,
            "expert_count": self.expert_count,
            "expert_used_count": self.expert_used_count,
            "tensor_bytes": self.tensor_bytes,
            "bytes_per_token": self.bytes_per_token,
            "n_vocab": self.n_vocab,
            "synthetic": self.synthetic,
        }


def _int_field(header: GGUFHeader, key: str, default: int = 0) -> int:
    value = header.value(key)
    if value is None:
        return default
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv on some archs): take the max
        numbers = [int(v) for v in value if isinstance(v, int | float)]
        return max(numbers) if numbers else default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _keep_small_arrays(key: str, count: int) -> bool:
    return not key.startswith("tokenizer.") and count <= MAX_KEPT_ARRAY


def shard_paths(path: Path, split_count: int) -> tuple[Path, ...]:
    """The files of a split model (``name-00001-of-00003.gguf``), in order, starting from the first.

    The name and ``split.count`` must agree, and ``path`` must be the first shard: llama.cpp loads a split
    model from its first file and finds the rest by name.
    """
    if not 1 <= split_count <= MAX_SHARDS:
        raise corrupt(path, f"split.count is {split_count} (1 to {MAX_SHARDS}): the header is corrupt")
    match = SHARD_PATTERN.match(path.name)
    named_count = int(match.group("count")) if match else 1
    if split_count == 1 and named_count <= 1:
        return (path,)
    if match is None:
        raise corrupt(path, f"model is split into {split_count} files but the name does not follow "
                      "'<name>-00001-of-000NN.gguf'", "pass the first shard under its original name")
    stem = match.group("stem")
    if named_count != split_count:
        raise corrupt(path, f"the name says {named_count} shards but the file's split.count says {split_count}",
                      "pass the shards under the names gguf-split gave them, or download them again")
    if int(match.group("no")) != 1:
        raise UserError(f"{path}: is shard {int(match.group('no'))} of {split_count}, not the first",
                        f"pass the first shard, {stem}-00001-of-{split_count:05d}.gguf")
    return tuple(path.with_name(f"{stem}-{i:05d}-of-{split_count:05d}.gguf") for i in range(1, split_count + 1))


def _read_shards(path: Path, first: GGUFHeader) -> list[GGUFHeader]:
    """Every shard's header; each must name the same split and its own place in it."""
    split_count = _int_field(first, "split.count", 1)
    files = shard_paths(path, split_count)
    headers = [first]
    for number, shard in enumerate(files[1:], start=2):
        if not shard.exists():
            raise corrupt(shard, f"shard {number} of {split_count} is missing",
                          f"download every shard next to {path.name}")
        headers.append(read_header(shard, keep_array=_keep_small_arrays))
    for number, header in enumerate(headers, start=1):
        problem = shard_place_problem(header, number, split_count)
        if problem is not None:
            raise corrupt(header.path, problem, SPLIT_MIXED_FIX)
    return headers


def _shared_tensor_names(names: set[str]) -> set[str]:
    """Tensors that are looked up rather than streamed per token."""
    return {n for n in names if n.startswith("token_embd.") or n.startswith("per_layer_token_embd.")}


def inspect_model(path: Path | str) -> ModelInfo:
    """Validate ``path`` (and its shards) and return its metadata, or raise one clear :class:`UserError`."""
    path = Path(path).expanduser()
    first = read_header(path, keep_array=_keep_small_arrays)
    headers = _read_shards(path, first)
    arch = str(first.value("general.architecture") or "")
    if not arch:
        raise corrupt(path, "GGUF metadata has no general.architecture: not a llama.cpp language model",
                      NOT_A_MODEL_FIX)

    tensor_types: Counter[str] = Counter()
    n_params = 0
    tensor_bytes = 0
    expert_bytes = 0
    names: set[str] = set()
    tensors = [tensor for header in headers for tensor in header.tensors]
    for tensor in tensors:
        if tensor.name in names:
            raise corrupt(tensor_path(headers, tensor.name), f"tensor '{tensor.name}' is in two shards",
                          "download every shard of one model again")
        names.add(tensor.name)
        n_params += tensor.n_elements
        tensor_bytes += tensor.n_bytes
        tensor_types[tensor.type_name] += tensor.n_bytes
        if "_exps." in tensor.name:
            expert_bytes += tensor.n_bytes
    shared = _shared_tensor_names(names)
    shared_bytes = sum(tensor.n_bytes for tensor in tensors if tensor.name in shared)
    n_layers = _int_field(first, f"{arch}.block_count")
    n_embd = _int_field(first, f"{arch}.embedding_length")
    _check_meaning(path, arch, tensors=len(names), n_params=n_params, n_layers=n_layers, n_embd=n_embd)

    expert_count = _int_field(first, f"{arch}.expert_count")
    expert_used = _int_field(first, f"{arch}.expert_used_count")
    tied_output = "output.weight" not in names
    streamed = tensor_bytes - shared_bytes - expert_bytes
    if tied_output:  # the embedding matrix doubles as the output projection and is read in full per token
        streamed += shared_bytes
    if expert_count and expert_used:
        streamed += expert_bytes * expert_used // expert_count
    else:
        streamed += expert_bytes

    n_head = _int_field(first, f"{arch}.attention.head_count")
    head_dim_default = n_embd // n_head if n_head else 0
    file_type = _file_type_name(first.value("general.file_type"))
    dominant = tensor_types.most_common(1)[0][0]
    return ModelInfo(
        path=path,
        files=tuple(header.path for header in headers),
        size_bytes=sum(header.file_size for header in headers),
        gguf_version=first.version,
        architecture=arch,
        name=str(first.value("general.name") or path.stem),
        file_type=file_type or dominant,
        dominant_tensor_type=dominant,
        n_params=n_params,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_int_field(first, f"{arch}.attention.head_count_kv", n_head),
        head_dim_k=_int_field(first, f"{arch}.attention.key_length", head_dim_default),
        head_dim_v=_int_field(first, f"{arch}.attention.value_length", head_dim_default),
        context_length=_int_field(first, f"{arch}.context_length"),
        expert_count=expert_count,
        expert_used_count=expert_used,
        tensor_bytes=tensor_bytes,
        bytes_per_token=streamed,
        tensor_types=dict(tensor_types),
        n_vocab=_vocab_size(first, arch),
        synthetic=first.value(SYNTHETIC_KEY) is True,
    )


def tensor_path(headers: list[GGUFHeader], name: str) -> Path:
    """The last shard that holds tensor ``name`` (where a duplicate shows up)."""
    return next(h.path for h in reversed(headers) if any(t.name == name for t in h.tensors))


def _check_meaning(path: Path, arch: str, *, tensors: int, n_params: int, n_layers: int, n_embd: int) -> None:
    """What a well-formed file still needs to be a model llama.cpp can run: checked before "valid"."""
    fix = "pass a complete model converted by llama.cpp's convert_hf_to_gguf.py, not a vocabulary-only file"
    if not tensors:
        raise corrupt(path, "the model has no tensors", fix)
    if n_params <= 0:
        raise corrupt(path, "the model's tensors hold no parameters (every tensor is empty)", fix)
    if n_layers <= 0:
        raise corrupt(path, f"the model has no layers ({arch}.block_count is missing or 0)", fix)
    if n_embd <= 0:
        raise corrupt(path, f"the model has no embedding size ({arch}.embedding_length is missing or 0)", fix)


def _vocab_size(header: GGUFHeader, arch: str) -> int:
    tokens = header.field("tokenizer.ggml.tokens")
    if tokens is not None and tokens.count is not None:
        return tokens.count
    return _int_field(header, f"{arch}.vocab_size")


def _file_type_name(raw: Any) -> str:
    if raw is None:
        return ""
    import gguf

    try:
        name = gguf.LlamaFileType(int(raw)).name
    except (ValueError, TypeError):
        return f"unknown({raw})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def check_fits_in_memory(info: ModelInfo, available_bytes: int, *, headroom_bytes: int = 0) -> None:
    """Refuse a model that cannot be held in memory: llama.cpp would thrash or be killed mid-trial."""
    needed = info.size_bytes + headroom_bytes
    if needed > available_bytes:
        gib = 1024**3
        raise UserError(
            f"{info.path}: model needs {needed / gib:.1f} GiB but only {available_bytes / gib:.1f} GiB of "
            "memory is available on this host",
            "use a smaller quantization of the model, free memory, or tune on a host with more RAM "
            "(`llamahost size --model ...` suggests one)",
        )
