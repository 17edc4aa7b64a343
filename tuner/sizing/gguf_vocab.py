"""Read a GGUF model's vocabulary size from its header, without parsing the token list.

The sizing engine needs the vocabulary size for one term (the logits buffer) and :class:`ModelInfo` does
not carry it. ``gguf.GGUFReader`` would parse every token string into Python objects (seconds for a
49k-token vocabulary, far more for 150k); the count is stored right before the array, so this scans the
metadata key-value pairs and stops at ``tokenizer.ggml.tokens``, skipping earlier values by their sizes.
The file must already have passed :func:`tuner.model.gguf_file.inspect_model`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from tuner.model.gguf_file import check_header

TOKENS_KEY = "tokenizer.ggml.tokens"
HEADER_BYTES = 24
TYPE_STRING = 8
TYPE_ARRAY = 9
# GGUF metadata value types with a fixed size in bytes (uint8 .. float64, bool).
FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
UNSIGNED_FORMATS = {0: "<B", 2: "<H", 4: "<I", 10: "<Q", 1: "<b", 3: "<h", 5: "<i", 11: "<q"}


class _Truncated(Exception):
    pass


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise _Truncated
    return data


def _u32(handle: BinaryIO) -> int:
    value: int = struct.unpack("<I", _read(handle, 4))[0]
    return value


def _u64(handle: BinaryIO) -> int:
    value: int = struct.unpack("<Q", _read(handle, 8))[0]
    return value


def _skip_value(handle: BinaryIO, value_type: int) -> None:
    if value_type in FIXED_SIZES:
        handle.seek(FIXED_SIZES[value_type], 1)
    elif value_type == TYPE_STRING:
        handle.seek(_u64(handle), 1)
    elif value_type == TYPE_ARRAY:
        element_type = _u32(handle)
        count = _u64(handle)
        if element_type in FIXED_SIZES:
            handle.seek(FIXED_SIZES[element_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(handle, element_type)
    else:
        raise _Truncated


def gguf_vocab_size(path: Path) -> int | None:
    """The number of tokens of the model's tokenizer, or None when the header does not say."""
    path = Path(path)
    _, _, n_kv = check_header(path)
    arch_vocab: int | None = None
    try:
        with path.open("rb") as handle:
            handle.seek(HEADER_BYTES)
            for _ in range(n_kv):
                key = _read(handle, _u64(handle)).decode("utf-8", errors="replace")
                value_type = _u32(handle)
                if key == TOKENS_KEY and value_type == TYPE_ARRAY:
                    _u32(handle)  # element type: strings
                    return _u64(handle)
                if key.endswith(".vocab_size") and value_type in UNSIGNED_FORMATS:
                    fmt = UNSIGNED_FORMATS[value_type]
                    arch_vocab = int(struct.unpack(fmt, _read(handle, struct.calcsize(fmt)))[0])
                    continue
                _skip_value(handle, value_type)
    except _Truncated:
        return arch_vocab
    return arch_vocab
