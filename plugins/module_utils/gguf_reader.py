"""Read a GGUF file's header (metadata and tensor table) with every length bounded by the bytes left in the file.

The one GGUF reader for the tuner (``tuner.model.gguf_reader`` links to this file, and
``tuner.model.gguf_header`` turns its errors into the CLI's) and for the collection (``model_fetch`` checks
every downloaded file with it on the host before the unit may point to it). It runs on the managed host, so it
keeps to the standard library and to Python 3.8 at run time, and carries llama.cpp's tensor-type table itself
(a test holds it equal to the ``gguf`` package's).

Why not ``gguf.GGUFReader``: it trusts the counts it reads. A 200-byte file whose numeric array claims 2^40
elements makes it allocate until the host runs out of memory, it makes one numpy view per string (seconds
for a real vocabulary), and a FIFO named ``.gguf`` blocks it forever. A model file is input from a download
or a mirror, so it is treated as hostile here:

- only a regular file is opened (checked on the open descriptor, so a FIFO or device is never read);
- before any read or skip, the length is checked against the bytes that remain in the file, and an array's
  count times its smallest element size against the same; counts above limits far past any real model are
  refused outright, so the time to read a header is bounded by the file's size and those limits;
- array elements are kept only where the caller asks for them; the others are walked (strings) or skipped;
- every tensor's type, shape, alignment and data range is checked against the format and the file's size.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    KeepArray = Callable[[str, int], bool]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24
# Far above any real model (a 400B MoE has a few thousand tensors and a few hundred metadata keys; the largest
# vocabularies have about 260k tokens), far below what would let a corrupt header cost minutes or gigabytes.
MAX_TENSORS = 1_000_000
MAX_METADATA_KEYS = 100_000
MAX_ARRAY_ELEMENTS = 1 << 24
MAX_KEY_BYTES = 65_535
MAX_NESTED_ARRAYS = 4
MAX_KEPT_STRING_BYTES = 1 << 20  # longer string values (none in a real model) are skipped, not held in memory
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL; llama.cpp refuses longer names
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

# GGUF metadata value types (gguf.GGUFValueType) -> struct format of one scalar.
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
STRING = 8
ARRAY = 9
# The fewest bytes one element of each type takes in the file: a string is at least its 8-byte length,
# an array its 4-byte type and 8-byte count.
_MIN_ELEMENT_BYTES = {**{t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}, STRING: 8, ARRAY: 12}
_U64 = struct.Struct("<Q")
CORRUPT_FIX = "download the model again (a truncated or corrupted download is the usual cause)"


# type id -> (name, elements per block, bytes per block): the pinned gguf package's GGML_QUANT_SIZES (a test
# holds them equal), carried here because the managed host has no gguf package.
TENSOR_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


class GGUFError(ValueError):
    """A file that is not a whole, well-formed GGUF model: ``message`` names the file and the fault, ``fix`` what
    to do. The tuner turns it into a UserError (exit 2), ``model_fetch`` into a failed task."""

    def __init__(self, message: str, fix: str = CORRUPT_FIX) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


@dataclass(frozen=True)
class MetadataField:
    """One metadata key-value pair as stored: its GGUF value type (and element type for arrays), strings raw.

    ``value`` is None where it was not kept (an array nobody asked for, an oversized string); ``count`` is an
    array's number of elements either way.
    """

    key: str
    value_type: int
    value: Any  # int | float | bool | bytes, a list of those for arrays, or None when not kept
    sub_type: int | None = None
    count: int | None = None


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, checked: ``start`` is absolute, ``n_bytes`` from the type's block size."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (the contiguous dimension) first
    type_id: int
    type_name: str
    start: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    fields: tuple[MetadataField, ...]
    tensors: tuple[TensorInfo, ...]
    data_offset: int

    def field(self, key: str) -> MetadataField | None:
        return next((f for f in self.fields if f.key == key), None)

    def value(self, key: str) -> Any:
        """A kept value, strings decoded (undecodable bytes replaced); None when absent or not kept."""
        found = self.field(key)
        if found is None:
            return None
        if isinstance(found.value, bytes):
            return found.value.decode("utf-8", errors="replace")
        return found.value


def corrupt(path: Path, what: str, fix: str = CORRUPT_FIX) -> GGUFError:
    return GGUFError(f"{path}: {what}", fix)


@contextmanager
def open_regular_file(path: Path) -> Iterator[tuple[int, int]]:
    """Open ``path`` for reading only if it is a regular file; yield (descriptor, size).

    ``O_NONBLOCK`` keeps the open itself from waiting for a FIFO's writer; the type is checked on the open
    descriptor, so a file swapped after a ``stat`` cannot slip through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise GGUFError(f"{path}: model file not found", "pass the path of an existing .gguf file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a model file", "pass the path of a .gguf file") from None
    except PermissionError:
        raise GGUFError(f"{path}: cannot read the model file (permission denied)",
                        "make the file readable by this user") from None
    except OSError as exc:
        raise GGUFError(f"{path}: cannot open the model file ({exc.strerror})",
                        "pass the path of a .gguf file on a readable disk") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise GGUFError(f"{path}: is a directory, not a model file", "pass the path of a .gguf file")
        if not stat.S_ISREG(info.st_mode):
            raise GGUFError(f"{path}: is not a regular file (a FIFO, socket or device): it is not read",
                            "pass the path of a .gguf file on disk")
        yield fd, info.st_size
    finally:
        os.close(fd)


def parse_prefix(path: Path, head: bytes, file_size: int) -> tuple[int, int, int]:
    """Check magic, version and counts in the first bytes; return (version, n_tensors, n_kv)."""
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise corrupt(path, "not a GGUF file (the magic bytes 'GGUF' are missing)",
                      "pass a llama.cpp model in GGUF format (convert other formats with convert_hf_to_gguf.py)")
    if len(head) < HEADER_BYTES:
        raise corrupt(path, f"GGUF header truncated ({len(head)} of {HEADER_BYTES} bytes)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:HEADER_BYTES])
    if version not in SUPPORTED_VERSIONS:
        raise corrupt(path, f"unsupported GGUF version {version} (supported: "
                      f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
                      "re-export the model with a current llama.cpp (version 3 files)")
    if n_tensors > MAX_TENSORS:
        raise corrupt(path, f"header claims {n_tensors} tensors (limit {MAX_TENSORS}): the header is corrupt")
    if n_kv > MAX_METADATA_KEYS:
        raise corrupt(path, f"header claims {n_kv} metadata keys (limit {MAX_METADATA_KEYS}): the header is corrupt")
    room = file_size - HEADER_BYTES
    # A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor entry 8 + 4 + 8 + 4 + 8.
    if n_kv * 13 + n_tensors * 32 > room:
        raise corrupt(path, f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the "
                      f"{room} bytes after it can hold: the file is truncated or corrupt")
    return version, n_tensors, n_kv


class _Cursor:
    """Sequential little-endian reads from a mapped file, every length checked before it is read or skipped."""

    def __init__(self, path: Path, data: mmap.mmap | bytes, offset: int) -> None:
        self.path = path
        self.data = data
        self.offset = offset

    def ensure(self, n: int, what: str) -> None:
        if n < 0 or self.offset + n > len(self.data):
            raise corrupt(self.path, f"{what} at byte {self.offset} claims {n} bytes, but only "
                          f"{len(self.data) - self.offset} remain: the file is truncated or corrupt")

    def take(self, n: int, what: str) -> bytes:
        self.ensure(n, what)
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return bytes(chunk)

    def skip(self, n: int, what: str) -> None:
        self.ensure(n, what)
        self.offset += n

    def skip_strings(self, count: int, what: str) -> None:
        """Walk ``count`` strings without keeping them (a vocabulary of 260k tokens takes about 0.1 s)."""
        data, offset, end = self.data, self.offset, len(self.data)
        length_at = _U64.unpack_from
        for _ in range(count):
            if offset + 8 > end:
                break
            offset += 8 + length_at(data, offset)[0]
            if offset > end:
                break
        else:
            self.offset = offset
            return
        raise corrupt(self.path, f"{what} runs past the end of the file at byte {self.offset}: "
                      "the file is truncated or corrupt")

    def scalar(self, value_type: int) -> Any:
        fmt = SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise corrupt(self.path, f"unknown GGUF metadata value type {value_type} at byte {self.offset}: "
                          "the header is corrupt")
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), "a value"))[0]

    def string(self, what: str, *, limit: int | None = None, keep: bool = True) -> bytes | None:
        length = int(self.scalar(10))
        if limit is not None and length > limit:
            raise corrupt(self.path, f"{what} at byte {self.offset - 8} is {length} bytes long "
                          f"(limit {limit}): the header is corrupt")
        if not keep or length > MAX_KEPT_STRING_BYTES:
            self.skip(length, what)
            return None
        return self.take(length, what)

    def value(self, key: str, value_type: int, keep_array: KeepArray, depth: int = 0, kept: bool = False
              ) -> tuple[Any, int | None, int | None]:
        """(value, element type, count) of one metadata value; arrays' elements only where kept (asked of
        ``keep_array`` for a top-level array; a nested one is kept with its parent)."""
        if value_type == STRING:
            return self.string(f"the string value of '{key}'"), None, None
        if value_type != ARRAY:
            return self.scalar(value_type), None, None
        if depth >= MAX_NESTED_ARRAYS:
            raise corrupt(self.path, f"'{key}' nests arrays more than {MAX_NESTED_ARRAYS} deep: "
                          "the header is corrupt")
        sub_type = int(self.scalar(4))
        count = int(self.scalar(10))
        if sub_type not in _MIN_ELEMENT_BYTES:
            raise corrupt(self.path, f"'{key}' is an array of unknown type {sub_type}: the header is corrupt")
        if count > MAX_ARRAY_ELEMENTS:
            raise corrupt(self.path, f"'{key}' claims {count} elements (limit {MAX_ARRAY_ELEMENTS}): "
                          "the header is corrupt")
        self.ensure(count * _MIN_ELEMENT_BYTES[sub_type], f"the array '{key}' of {count} elements")
        keep = keep_array(key, count) if depth == 0 else kept
        if sub_type in SCALAR_FORMATS:
            fmt = SCALAR_FORMATS[sub_type]
            if not keep:
                self.skip(struct.calcsize(fmt) * count, f"the array '{key}'")
                return None, sub_type, count
            raw = self.take(struct.calcsize(fmt) * count, f"the array '{key}'")
            return [item[0] for item in struct.iter_unpack(fmt, raw)], sub_type, count
        if sub_type == STRING:
            if not keep:
                self.skip_strings(count, f"the array '{key}'")
                return None, sub_type, count
            return [self.string(f"an element of '{key}'") for _ in range(count)], sub_type, count
        nested = [self.value(key, ARRAY, keep_array, depth + 1, keep)[0] for _ in range(count)]
        return (nested if keep else None), sub_type, count


def _read_tensor(cursor: _Cursor, types: dict[int, tuple[str, int, int]], index: int) -> tuple[TensorInfo, int]:
    """One tensor entry; returns it with its start relative to the data section."""
    raw_name = cursor.string(f"the name of tensor {index}", limit=MAX_TENSOR_NAME_BYTES)
    assert raw_name is not None
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt(cursor.path, f"the name of tensor {index} is not UTF-8: the header is corrupt") from None
    n_dims = int(cursor.scalar(4))
    if not 1 <= n_dims <= MAX_DIMS:
        raise corrupt(cursor.path, f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS}): "
                      "the header is corrupt")
    shape = tuple(int(cursor.scalar(10)) for _ in range(n_dims))
    type_id = int(cursor.scalar(4))
    relative = int(cursor.scalar(10))
    if type_id not in types:
        raise corrupt(cursor.path, f"tensor '{name}' has unknown type {type_id}",
                      "update llamahost, or re-quantize the model with a type this llama.cpp knows")
    type_name, block, block_bytes = types[type_id]
    if shape[0] % block:
        raise corrupt(cursor.path, f"tensor '{name}': its first dimension {shape[0]} is not a multiple of "
                      f"the {type_name} block size {block}: the header is corrupt")
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    if n_elements >= 1 << 63:
        raise corrupt(cursor.path, f"tensor '{name}' claims {n_elements} elements: the header is corrupt")
    n_bytes = n_elements // block * block_bytes
    return TensorInfo(name, shape, type_id, type_name, relative, n_elements, n_bytes), relative


def read_header(path: Path, *, keep_array: KeepArray = lambda key, count: False,
                check_data: bool = True) -> GGUFHeader:
    """Read and check the header of one GGUF file; raise one :class:`GGUFError` naming what is wrong.

    Scalars and strings are kept; the elements of an array only where ``keep_array(key, count)`` says so.
    Every tensor is checked to lie inside the file (a truncated download ends there), unless ``check_data`` is
    False: then the header alone must be whole (the first megabytes of a download describe the whole model).
    """
    with open_regular_file(path) as (fd, size):
        head = os.pread(fd, HEADER_BYTES, 0)
        version, n_tensors, n_kv = parse_prefix(path, head, size)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(path, data, HEADER_BYTES)
            fields = []
            for _ in range(n_kv):
                raw_key = cursor.string("a metadata key", limit=MAX_KEY_BYTES)
                assert raw_key is not None
                key = raw_key.decode("utf-8", errors="replace")
                value_type = int(cursor.scalar(4))
                if value_type not in _MIN_ELEMENT_BYTES:
                    raise corrupt(path, f"metadata key '{key}' has unknown value type {value_type}: "
                                  "the header is corrupt")
                value, sub_type, count = cursor.value(key, value_type, keep_array)
                fields.append(MetadataField(key, value_type, value, sub_type, count))
            types = TENSOR_TYPES
            entries = [_read_tensor(cursor, types, index) for index in range(n_tensors)]
            table_end = cursor.offset
    alignment = _alignment(path, fields)
    data_offset = -(-table_end // alignment) * alignment
    tensors = []
    seen: set[str] = set()
    for tensor, relative in entries:
        if tensor.name in seen:
            raise corrupt(path, f"tensor '{tensor.name}' appears twice: the header is corrupt")
        seen.add(tensor.name)
        if relative % alignment:
            raise corrupt(path, f"tensor '{tensor.name}' starts at offset {relative}, not a multiple of the "
                          f"alignment {alignment}: the header is corrupt")
        start = data_offset + relative
        end = start + tensor.n_bytes
        if check_data and end > size:
            raise corrupt(path, f"tensor '{tensor.name}' ends at byte {end}, past the end of the file "
                          f"({size} bytes): the file is truncated")
        tensors.append(TensorInfo(tensor.name, tensor.shape, tensor.type_id, tensor.type_name, start,
                                  tensor.n_elements, tensor.n_bytes))
    return GGUFHeader(path, version, size, tuple(fields), tuple(tensors), data_offset)


def _alignment(path: Path, fields: list[MetadataField]) -> int:
    field = next((f for f in fields if f.key == ALIGNMENT_KEY), None)
    if field is None:
        return DEFAULT_ALIGNMENT
    value = field.value
    if field.value_type != 4 or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise corrupt(path, f"{ALIGNMENT_KEY} is {value!r}, not a power of two (uint32): the header is corrupt")
    return value


NOT_A_MODEL_FIX = "pass a model converted by llama.cpp's convert_hf_to_gguf.py"
SPLIT_MIXED_FIX = "download every shard of one model again"


def shard_place_problem(header: GGUFHeader, number: int, count: int) -> str | None:
    """Why ``header`` is not shard ``number`` (from 1) of a model in ``count`` files, or None when it is.

    gguf-split writes ``split.count`` and ``split.no`` (from 0) into every shard; a file without them is a
    whole model. Shards of two downloads, or a shard renamed to another's place, disagree here, and llama.cpp
    would load a model stitched from both.
    """
    stated = header.value("split.count")
    stated_count = 1 if stated is None else stated
    index = header.value("split.no")
    if stated_count == count and (index is None or index == number - 1):
        return None
    place = f"shard {index + 1}" if isinstance(index, int) else "a shard"
    return (f"shard {number} of {count} says it is {place} of {stated_count}: the shards belong to different "
            "splits or are out of place")


def model_file_problem(path: str | Path, number: int = 1, count: int = 1) -> GGUFError | None:
    """What makes ``path`` unfit to serve as shard ``number`` of ``count``, or None: the checks a file passes
    on the host before a unit may point to it (whole header, every tensor inside the file, its place in the
    split, an architecture in the first shard)."""
    try:
        header = read_header(Path(path))
    except GGUFError as exc:
        return exc
    problem = shard_place_problem(header, number, count)
    if problem is not None:
        return GGUFError(f"{path}: {problem}", SPLIT_MIXED_FIX)
    if number == 1 and not header.value("general.architecture"):
        return GGUFError(f"{path}: GGUF metadata has no general.architecture: not a llama.cpp language model",
                         NOT_A_MODEL_FIX)
    return None
