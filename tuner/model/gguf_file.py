"""Model intake: validate a GGUF file and read the metadata the tuner and the sizing engine need.

Nothing is handed to llama.cpp before :func:`inspect_model` has accepted it. llama.cpp aborts the whole
process (or worse, reads past a mapping) on a broken file; a tuner that runs overnight must say at once,
in one sentence, which file is wrong and why.

The header is checked by hand first (magic, version, counts within sane limits) because ``GGUFReader``
trusts the counts and would try to allocate or loop on a corrupt header. Then ``gguf.GGUFReader`` parses
the rest; its assorted ``ValueError``/``IndexError``/``KeyError`` become one :class:`UserError`. Finally
every tensor must lie inside the file, which catches truncated downloads.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import UserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Far above any real model (a 400B MoE has a few thousand tensors and a few hundred metadata keys),
# far below what would make the reader allocate gigabytes for a corrupt header.
MAX_TENSORS = 1_000_000
MAX_METADATA_KEYS = 100_000
HEADER_BYTES = 24
SHARD_PATTERN = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


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
        }


def _bad(path: Path, what: str, fix: str = "") -> UserError:
    return UserError(
        f"{path}: {what}",
        fix or "download the model again (a truncated or corrupted download is the usual cause)",
    )


def check_header(path: Path) -> tuple[int, int, int]:
    """Check magic, version and counts from the first bytes; return (version, n_tensors, n_kv)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"{path}: model file not found", "pass the path of an existing .gguf file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a model file", "pass the path of a .gguf file") from None
    except PermissionError:
        raise UserError(f"{path}: cannot read the model file (permission denied)",
                        "make the file readable by this user") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise _bad(path, "not a GGUF file (the magic bytes 'GGUF' are missing)",
                   "pass a llama.cpp model in GGUF format (convert other formats with convert_hf_to_gguf.py)")
    if len(head) < HEADER_BYTES:
        raise _bad(path, f"GGUF header truncated ({len(head)} of {HEADER_BYTES} bytes)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:HEADER_BYTES])
    if version not in SUPPORTED_VERSIONS:
        raise _bad(path, f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
                   "re-export the model with a current llama.cpp (version 3 files)")
    if n_tensors > MAX_TENSORS:
        raise _bad(path, f"header claims {n_tensors} tensors (limit {MAX_TENSORS}): the header is corrupt")
    if n_kv > MAX_METADATA_KEYS:
        raise _bad(path, f"header claims {n_kv} metadata keys (limit {MAX_METADATA_KEYS}): the header is corrupt")
    return version, n_tensors, n_kv


def _field_value(reader: Any, key: str) -> Any:
    field_ = reader.get_field(key)
    if field_ is None:
        return None
    value = field_.contents()
    return value


def _int_field(reader: Any, key: str, default: int = 0) -> int:
    value = _field_value(reader, key)
    if value is None:
        return default
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv on some archs): take the max
        numbers = [int(v) for v in value if isinstance(v, int | float)]
        return max(numbers) if numbers else default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def shard_paths(path: Path, split_count: int) -> tuple[Path, ...]:
    """The files of a split model (``name-00001-of-00003.gguf``), in order, starting from the first."""
    if split_count <= 1:
        return (path,)
    match = SHARD_PATTERN.match(path.name)
    if match is None:
        raise _bad(path, f"model is split into {split_count} files but the name does not follow "
                   "'<name>-00001-of-000NN.gguf'", "pass the first shard under its original name")
    stem = match.group("stem")
    return tuple(path.with_name(f"{stem}-{i:05d}-of-{split_count:05d}.gguf") for i in range(1, split_count + 1))


def _read_one(path: Path) -> tuple[Any, int]:
    """Parse one GGUF file with the reference reader and check that all tensors lie inside it."""
    version, _, _ = check_header(path)
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except ValueError as exc:
        if "reshape" in str(exc):  # the reader maps each tensor; a short file leaves the last one short
            raise _bad(path, f"tensor data runs past the end of the file ({path.stat().st_size} bytes): "
                       "the file is truncated") from None
        raise _bad(path, f"GGUF metadata cannot be parsed ({exc})") from None
    except (IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise _bad(path, f"GGUF metadata cannot be parsed ({exc})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise _bad(path, f"tensor '{tensor.name}' ends at byte {end} but the file has {size} bytes "
                       "(the file is truncated)")
    return reader, version


def _shared_tensor_names(names: set[str]) -> set[str]:
    """Tensors that are looked up rather than streamed per token."""
    return {n for n in names if n.startswith("token_embd.") or n.startswith("per_layer_token_embd.")}


def inspect_model(path: Path | str) -> ModelInfo:
    """Validate ``path`` (and its shards) and return its metadata, or raise one clear :class:`UserError`."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf" and not path.exists():
        raise UserError(f"{path}: model file not found", "pass the path of an existing .gguf file")
    reader, version = _read_one(path)
    arch = str(_field_value(reader, "general.architecture") or "")
    if not arch:
        raise _bad(path, "GGUF metadata has no general.architecture: not a llama.cpp language model",
                   "pass a model converted by llama.cpp's convert_hf_to_gguf.py")
    split_count = _int_field(reader, "split.count", 1)
    files = shard_paths(path, split_count)
    readers = [reader]
    for shard in files[1:]:
        if not shard.exists():
            raise _bad(shard, f"shard {files.index(shard) + 1} of {split_count} is missing",
                       f"download every shard next to {path.name}")
        readers.append(_read_one(shard)[0])

    tensor_types: Counter[str] = Counter()
    n_params = 0
    tensor_bytes = 0
    expert_bytes = 0
    shared_bytes = 0
    names: set[str] = set()
    for r in readers:
        for tensor in r.tensors:
            n_params += int(tensor.n_elements)
            tensor_bytes += int(tensor.n_bytes)
            type_name = tensor.tensor_type.name
            tensor_types[type_name] += int(tensor.n_bytes)
            names.add(tensor.name)
            if "_exps." in tensor.name:
                expert_bytes += int(tensor.n_bytes)
    for r in readers:
        for tensor in r.tensors:
            if tensor.name in _shared_tensor_names(names):
                shared_bytes += int(tensor.n_bytes)
    if not names:
        raise _bad(path, "the model has no tensors", "pass a complete model, not a vocabulary-only file")

    expert_count = _int_field(reader, f"{arch}.expert_count")
    expert_used = _int_field(reader, f"{arch}.expert_used_count")
    tied_output = "output.weight" not in names
    streamed = tensor_bytes - shared_bytes - expert_bytes
    if tied_output:  # the embedding matrix doubles as the output projection and is read in full per token
        streamed += shared_bytes
    if expert_count and expert_used:
        streamed += expert_bytes * expert_used // expert_count
    else:
        streamed += expert_bytes

    n_embd = _int_field(reader, f"{arch}.embedding_length")
    n_head = _int_field(reader, f"{arch}.attention.head_count")
    head_dim_default = n_embd // n_head if n_head else 0
    file_type_raw = _field_value(reader, "general.file_type")
    file_type = _file_type_name(file_type_raw)
    dominant = tensor_types.most_common(1)[0][0]
    return ModelInfo(
        path=path,
        files=files,
        size_bytes=sum(p.stat().st_size for p in files),
        gguf_version=version,
        architecture=arch,
        name=str(_field_value(reader, "general.name") or path.stem),
        file_type=file_type or dominant,
        dominant_tensor_type=dominant,
        n_params=n_params,
        n_layers=_int_field(reader, f"{arch}.block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_int_field(reader, f"{arch}.attention.head_count_kv", n_head),
        head_dim_k=_int_field(reader, f"{arch}.attention.key_length", head_dim_default),
        head_dim_v=_int_field(reader, f"{arch}.attention.value_length", head_dim_default),
        context_length=_int_field(reader, f"{arch}.context_length"),
        expert_count=expert_count,
        expert_used_count=expert_used,
        tensor_bytes=tensor_bytes,
        bytes_per_token=streamed,
        tensor_types=dict(tensor_types),
        n_vocab=_vocab_size(reader, arch),
    )


def _vocab_size(reader: Any, arch: str) -> int:
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)  # one index per array element
    return _int_field(reader, f"{arch}.vocab_size")


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
