"""The tuner's side of the GGUF reader: the same checks, failures as :class:`UserError` (exit 2, with the fix).

The reader itself (:mod:`tuner.model.gguf_reader`, a link to the collection's ``module_utils``) is shared with
``model_fetch``, which runs it on the managed host; it raises its own :class:`GGUFError` because the host has
no ``tuner`` package. Callers in the tuner import from here, so every GGUF failure reaches the CLI the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tuner.errors import UserError
from tuner.model.gguf_reader import (
    ARRAY,
    CORRUPT_FIX,
    NOT_A_MODEL_FIX,
    SPLIT_MIXED_FIX,
    STRING,
    TENSOR_TYPES,
    GGUFError,
    GGUFHeader,
    MetadataField,
    TensorInfo,
    shard_place_problem,
)
from tuner.model.gguf_reader import read_header as _read_header

if TYPE_CHECKING:
    from tuner.model.gguf_reader import KeepArray

__all__ = ["ARRAY", "NOT_A_MODEL_FIX", "SPLIT_MIXED_FIX", "STRING", "TENSOR_TYPES", "GGUFHeader", "MetadataField",
           "TensorInfo", "as_user_error", "corrupt", "read_header", "shard_place_problem"]


def as_user_error(error: GGUFError) -> UserError:
    return UserError(error.message, error.fix)


def corrupt(path: Path, what: str, fix: str = CORRUPT_FIX) -> UserError:
    return UserError(f"{path}: {what}", fix)


def read_header(path: Path, *, keep_array: KeepArray = lambda key, count: False,
                check_data: bool = True) -> GGUFHeader:
    """:func:`tuner.model.gguf_reader.read_header`, raising :class:`UserError`."""
    try:
        return _read_header(path, keep_array=keep_array, check_data=check_data)
    except GGUFError as exc:
        raise as_user_error(exc) from None
