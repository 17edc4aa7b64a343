"""A model that changes under a study: the digest cache sees a file rewritten in place with its old size and
modification time, and a running measurer refuses a model whose bytes changed (the same bytes put back are
hashed again and accepted)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.model.checksum import cached_sha256, sha256_of
from tuner.model.gguf_file import inspect_model
from tuner.search import Measurer


def rewrite_in_place_keeping_size_and_mtime(path: Path) -> None:
    """Flip one byte near the end (tensor data), then set the modification time back: what `touch -r` after a
    careless in-place edit leaves. Only the change time, which nobody can set back, moves."""
    before = path.stat()
    with path.open("r+b") as handle:
        handle.seek(before.st_size - 1)
        last = handle.read(1)
        handle.seek(before.st_size - 1)
        handle.write(bytes([last[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.fixture
def model(tmp_path: Path, tiny_model_path: Path) -> Path:
    copy = tmp_path / "m.gguf"
    shutil.copy(tiny_model_path, copy)
    return copy


def test_the_digest_cache_sees_a_rewrite_that_kept_size_and_mtime(model: Path) -> None:
    first = cached_sha256(model)
    rewrite_in_place_keeping_size_and_mtime(model)
    assert cached_sha256(model) == sha256_of(model) != first


def measurer_of(model: Path, tmp_path: Path) -> Measurer:
    return Measurer(inspect_model(model), None, tmp_path / "logs", multi_node=False,  # type: ignore[arg-type]
                    model_sha256=cached_sha256(model))


def test_the_same_bytes_put_back_are_accepted(model: Path, tmp_path: Path) -> None:
    measurer = measurer_of(model, tmp_path)
    staged = tmp_path / "staged.gguf"
    shutil.copy(model, staged)
    os.replace(staged, model)  # a new inode with the same bytes
    measurer.check_model_unchanged()
    measurer.check_model_unchanged()  # and it is remembered: no second hash needed


def test_a_model_rewritten_or_removed_mid_run_is_refused(model: Path, tmp_path: Path) -> None:
    measurer = measurer_of(model, tmp_path)
    rewrite_in_place_keeping_size_and_mtime(model)
    with pytest.raises(UserError, match="changed during the run \\(its sha256 is not the one measured so far\\)"):
        measurer.check_model_unchanged()
    model.unlink()
    with pytest.raises(UserError, match="changed during the run \\(it is gone\\)"):
        measurer.check_model_unchanged()
