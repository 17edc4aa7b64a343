"""Model intake: every broken file is refused with one clear error naming the file and the problem.

Broken files are made from small synthetic GGUF files written with the reference ``gguf`` writer and
from copies of the real small model, damaged the ways downloads and disks damage files.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from tuner.errors import UserError
from tuner.model.gguf_file import check_fits_in_memory, inspect_model


def write_model(path: Path, *, experts: int = 0, tied: bool = False, extra_kv: dict[str, int] | None = None) -> Path:
    """A tiny llama-architecture GGUF: 2 layers, embedding 64, 4 heads, 2 KV heads."""
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(2048)
    writer.add_file_type(0)
    for key, value in (extra_kv or {}).items():
        writer.add_uint32(key, value)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
    writer.add_tensor("token_embd.weight", np.ones((100, 64), dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.ones((100, 64), dtype=np.float32))
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_q.weight", np.ones((64, 64), dtype=np.float32))
        if experts:
            writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ones((experts, 32, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_metadata_of_a_dense_model(tmp_path: Path) -> None:
    info = inspect_model(write_model(tmp_path / "dense.gguf"))
    assert (info.architecture, info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == ("llama", 2, 64, 4, 2)
    assert info.head_dim_k == 16
    assert info.n_params == 100 * 64 * 2 + 2 * 64 * 64
    embd = 100 * 64 * 4
    assert info.bytes_per_token == info.tensor_bytes - embd  # the embedding is looked up, not streamed
    assert info.kv_bytes_per_token() == 2 * 2 * (16 + 16) * 2


def test_tied_output_streams_the_embedding(tmp_path: Path) -> None:
    info = inspect_model(write_model(tmp_path / "tied.gguf", tied=True))
    assert info.bytes_per_token == info.tensor_bytes


def test_moe_reads_only_the_active_experts(tmp_path: Path) -> None:
    info = inspect_model(write_model(tmp_path / "moe.gguf", experts=8))
    expert_bytes = 2 * 8 * 32 * 64 * 4
    dense = info.tensor_bytes - expert_bytes - 100 * 64 * 4
    assert info.bytes_per_token == dense + expert_bytes * 2 // 8


def test_the_real_small_model(model_path: Path) -> None:
    info = inspect_model(model_path)
    assert info.architecture == "llama"
    assert info.n_layers == 30
    assert info.file_type == "Q4_1"
    assert 90e6 < info.bytes_per_token < info.size_bytes


@pytest.fixture
def real_copy(model_path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model_path, copy)
    return copy


@pytest.fixture
def real_header(model_path: Path, tmp_path: Path) -> Path:
    """The real model's first 4 MiB: its whole header, cheap to damage (the tensors end up outside)."""
    head = tmp_path / "head.gguf"
    with model_path.open("rb") as src:
        head.write_bytes(src.read(4 * 1024 * 1024))
    return head


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_bytes(b"just some text\n"), "not a GGUF file"),
    (lambda p: p.write_bytes(b""), "not a GGUF file"),
    (lambda p: p.write_bytes(p.read_bytes()[:10]), "header truncated"),
    (lambda p: patch(p, 4, struct.pack("<I", 99)), "unsupported GGUF version 99"),
    (lambda p: patch(p, 8, struct.pack("<Q", 2**40)), r"tensors \(limit"),
    (lambda p: patch(p, 16, struct.pack("<Q", 2**40)), r"metadata keys \(limit"),
    (lambda p: patch(p, 24, b"\xff" * 64), "the header is corrupt"),
])
def test_damaged_headers_are_refused(real_header: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    damage(real_header)
    with pytest.raises(UserError, match=message) as caught:
        inspect_model(real_header)
    assert str(real_header) in str(caught.value)


def test_truncated_download_is_refused(real_header: Path) -> None:
    with pytest.raises(UserError, match=r"past the end of the file \(4194304 bytes\): the file is truncated"):
        inspect_model(real_header)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        inspect_model(tmp_path / "nope.gguf")
    with pytest.raises(UserError, match="is a directory"):
        inspect_model(tmp_path)


def test_missing_shard_of_a_split_model(tmp_path: Path) -> None:
    first = write_model(tmp_path / "big-00001-of-00002.gguf", extra_kv={"split.count": 2})
    with pytest.raises(UserError, match="shard 2 of 2 is missing"):
        inspect_model(first)


def test_model_larger_than_memory(tmp_path: Path) -> None:
    info = inspect_model(write_model(tmp_path / "m.gguf"))
    check_fits_in_memory(info, info.size_bytes * 2)
    with pytest.raises(UserError, match=r"only 0\.0 GiB of memory is available"):
        check_fits_in_memory(info, info.size_bytes // 2)


def test_model_check_command(real_copy: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "tuner.cli", "model", "check", str(real_copy), "--json"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert '"architecture": "llama"' in ok.stdout
    patch(real_copy, 0, b"GGUX")
    bad = subprocess.run([sys.executable, "-m", "tuner.cli", "model", "check", str(real_copy)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "not a GGUF file" in bad.stderr and "Traceback" not in bad.stderr
