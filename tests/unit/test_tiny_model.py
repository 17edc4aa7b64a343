"""The tiny test model: deterministic bytes, accepted by the intake, the expected tensors, the source's tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.model.gguf_file import inspect_model
from tuner.model.tiny import tensor_shapes, tiny_model, tiny_model_name, write_tiny_model

MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def tiny(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", source=model_path)


# The reference reader takes seconds per file with a 49k-token vocabulary: each file is parsed once.
@pytest.fixture(scope="module")
def tiny_reader(tiny: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(tiny)


@pytest.fixture(scope="module")
def source_reader(model_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(model_path)


@pytest.fixture(scope="module")
def n_vocab(source_reader: gguf.GGUFReader) -> int:
    tokens = source_reader.get_field("tokenizer.ggml.tokens")
    assert tokens is not None
    return len(tokens.data)


def tokenizer_fields(reader: gguf.GGUFReader) -> dict[str, tuple[list[Any], Any]]:
    return {name: (list(field.types), field.contents())
            for name, field in reader.fields.items() if name.startswith("tokenizer.")}


def write_small_source(path: Path, *, tokenizer: bool = True) -> Path:
    """A fake tokenizer source with a 16-token vocabulary: quick to read, for shape and error tests."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(16)])
        writer.add_token_types([1] * 16)
        writer.add_bos_token_id(0)
    writer.add_tensor("token_embd.weight", np.ones((16, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_same_arguments_give_the_same_bytes(model_path: Path, tiny: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again.gguf", source=model_path)
    assert again.read_bytes() == tiny.read_bytes()
    other_seed = write_tiny_model(tmp_path / "seed1.gguf", source=model_path, seed=1)
    assert hashlib.sha256(other_seed.read_bytes()).hexdigest() != sha256_of(tiny)
    print(f"tiny model: {tiny.stat().st_size} bytes, sha256 {sha256_of(tiny)}")


def test_the_intake_accepts_it_as_a_small_f16_llama(tiny: Path, n_vocab: int) -> None:
    info = inspect_model(tiny)
    assert info.architecture == "llama"
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == (2, 64, 4, 4)
    assert info.head_dim_k == info.head_dim_v == 16
    assert info.context_length == 2048
    assert info.file_type == "F16"
    assert info.n_vocab == n_vocab > 0
    assert info.size_bytes == tiny.stat().st_size < MAX_BYTES
    assert info.bytes_per_token > 0  # tied output: the embedding is streamed per token


def test_tensor_table_has_the_expected_names_shapes_and_types(tiny_reader: gguf.GGUFReader, n_vocab: int) -> None:
    reader = tiny_reader
    expected = tensor_shapes(n_vocab, n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128)
    assert [t.name for t in reader.tensors] == list(expected)
    assert "output.weight" not in expected  # tied to token_embd.weight, which llama.cpp accepts
    for tensor in reader.tensors:
        assert tuple(tensor.data.shape) == expected[tensor.name], tensor.name
        if tensor.name.endswith("norm.weight"):
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.all(tensor.data == 1.0)
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
            values = np.asarray(tensor.data, dtype=np.float32)
            assert np.all(np.isfinite(values))
            assert 0.01 < float(values.std()) < 0.03


def test_tokenizer_fields_equal_the_sources(source_reader: gguf.GGUFReader, tiny_reader: gguf.GGUFReader) -> None:
    source = tokenizer_fields(source_reader)
    copied = tokenizer_fields(tiny_reader)
    assert "tokenizer.ggml.tokens" in source and "tokenizer.ggml.model" in source
    assert list(copied) == list(source)
    for name, (types, value) in source.items():
        assert copied[name][0] == types, name
        assert copied[name][1] == value, name


def test_model_metadata_llama_cpp_needs(tiny_reader: gguf.GGUFReader, n_vocab: int) -> None:
    reader = tiny_reader

    def value(key: str) -> Any:
        field = reader.get_field(key)
        assert field is not None, key
        return field.contents()

    assert value("general.architecture") == "llama"
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert value("llama.vocab_size") == n_vocab
    assert value("llama.block_count") == 2
    assert value("llama.feed_forward_length") == 128
    assert value("llama.attention.head_count_kv") == 4
    assert value("llama.rope.dimension_count") == 16
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_other_shapes_and_grouped_query_attention(tmp_path: Path) -> None:
    source = write_small_source(tmp_path / "source.gguf")
    path = write_tiny_model(tmp_path / "gqa.gguf", source=source, n_embd=32, n_layer=1, n_head=4, n_head_kv=2,
                            n_ff=64)
    info = inspect_model(path)
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv, info.n_vocab) == (1, 32, 4, 2, 16)
    reader = gguf.GGUFReader(path)
    shapes = {t.name: tuple(t.data.shape) for t in reader.tensors}
    assert shapes == tensor_shapes(16, n_embd=32, n_layer=1, n_head=4, n_head_kv=2, n_ff=64)
    assert shapes["blk.0.attn_k.weight"] == (16, 32)
    assert shapes["blk.0.ffn_down.weight"] == (32, 64)
    assert tokenizer_fields(reader) == tokenizer_fields(gguf.GGUFReader(source))


def test_tiny_model_generates_once_per_cache_dir(model_path: Path, tiny: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    digest = sha256_of(model_path)
    first = tiny_model(cache, source=model_path)
    assert first.parent == cache
    assert first.name == tiny_model_name(digest)
    assert digest[:16] in first.name
    assert first.read_bytes() == tiny.read_bytes()
    stamp = first.stat().st_mtime_ns
    assert tiny_model(cache, source=model_path) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not written again
    assert tiny_model(cache, source=model_path, seed=3) != first
    # nothing else is left in the cache directory: no temporaries, no .prev copies
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, tiny_model_name(digest, seed=3)])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_embd": 60, "n_head": 8}, "multiple of n_head"),
    ({"n_head": 4, "n_head_kv": 3}, "multiple of n_head_kv"),
    ({"n_embd": 12, "n_head": 4}, "must be even"),
    ({"n_layer": 0}, "n_layer must be positive"),
])
def test_impossible_shapes_are_refused(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_tiny_model(tmp_path / "bad.gguf", source=write_small_source(tmp_path / "source.gguf"), **kwargs)
    assert not (tmp_path / "bad.gguf").exists()


def test_a_source_without_tokenizer_is_refused(tmp_path: Path) -> None:
    source = write_small_source(tmp_path / "no-tokenizer.gguf", tokenizer=False)
    with pytest.raises(UserError, match="has no tokenizer"):
        write_tiny_model(tmp_path / "tiny.gguf", source=source)
    with pytest.raises(UserError, match="not found"):
        write_tiny_model(tmp_path / "tiny.gguf", source=tmp_path / "missing.gguf")
    assert not (tmp_path / "tiny.gguf").exists()


def test_a_truncated_source_is_refused(tmp_path: Path) -> None:
    source = write_small_source(tmp_path / "source.gguf")
    data = source.read_bytes()
    cut = data.index(b"t15")  # inside the token list
    source.write_bytes(data[:cut])
    with pytest.raises(UserError, match="truncated"):
        write_tiny_model(tmp_path / "tiny.gguf", source=source)
