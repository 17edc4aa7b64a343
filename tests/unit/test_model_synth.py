"""`llamahost model synth`: a real model's tensor table with random weights, and what it refuses.

The shapes are checked against a real converter's output (the bundled SmolLM2 model's header), the quant mix
against llama-quantize's rules, and the random blocks against gguf-py's own dequantizers. llama.cpp loading and
running the files is tests/server/test_synth_serves.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tuner.atomic import atomic_writer
from tuner.errors import UserError
from tuner.model.gguf_file import inspect_model
from tuner.model.gguf_header import read_header
from tuner.model.synth import _SCALE_FIELDS, block_pool, plan_from_header, tensor_table, write_synthetic
from tuner.model.synth_shape import (
    ModelShape,
    block_size,
    plan_tensors,
    shape_from_hf_config,
    use_more_bits,
)

# SmolLM2-135M's config.json on Hugging Face (the bundled model was converted from it).
SMOLLM2_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                  "intermediate_size": 1536, "max_position_embeddings": 8192, "rope_theta": 100000,
                  "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def synth_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", "model", "synth", *args], capture_output=True,
                          text=True, check=False, timeout=300)


def test_the_twin_of_the_bundled_model_has_its_tensor_table_and_size(model_path: Path, tmp_path: Path) -> None:
    twin = write_synthetic(plan_from_header(model_path), tmp_path / "twin.gguf", seed=1)
    real, fake = read_header(model_path), read_header(twin)
    assert tensor_table(fake.tensors) == tensor_table(real.tensors)
    assert abs(fake.file_size - real.file_size) <= real.file_size / 100, (fake.file_size, real.file_size)
    info = inspect_model(twin)
    assert info.synthetic and not inspect_model(model_path).synthetic
    assert info.name.endswith("(synthetic)") and info.bytes_per_token == inspect_model(model_path).bytes_per_token
    assert fake.value("tokenizer.ggml.pre") == real.value("tokenizer.ggml.pre")
    assert (fake.field("tokenizer.ggml.tokens").count ==  # type: ignore[union-attr]
            real.field("tokenizer.ggml.tokens").count)  # type: ignore[union-attr]


def test_the_first_megabytes_of_a_download_are_enough(model_path: Path, tmp_path: Path) -> None:
    header = read_header(model_path)
    partial = tmp_path / "partial.gguf"
    with model_path.open("rb") as source:
        partial.write_bytes(source.read(header.data_offset + 4096))
    with pytest.raises(UserError, match="truncated"):
        inspect_model(partial)  # not a model to run
    assert tensor_table(plan_from_header(partial).tensors) == tensor_table(header.tensors)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(partial.read_bytes()[:header.data_offset // 2])
    with pytest.raises(UserError, match=r"corrupt|truncated|ends"):
        plan_from_header(cut)  # the header itself must be whole


def test_a_config_json_gives_the_converters_tensor_names_and_shapes(model_path: Path) -> None:
    shape = shape_from_hf_config(SMOLLM2_CONFIG)
    planned = {(t.name, t.shape) for t in plan_tensors(shape, "Q8_0")}
    real = {(t.name, t.shape) for t in read_header(model_path).tensors}
    assert planned == real


def test_the_quant_mix_follows_llama_quantize() -> None:
    """Q4_K_M on a 32-layer Llama-3-8B shape: Q6_K output, attn_v and ffn_down in the use_more_bits layers,
    Q4_K everywhere else, F32 norms."""
    shape = ModelShape(arch="llama", n_vocab=128256, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336)
    types = {t.name: t.type_name for t in plan_tensors(shape, "Q4_K_M")}
    more = [layer for layer in range(32) if use_more_bits(layer, 32)]
    assert more[:6] == [0, 1, 2, 3, 6, 9] and more[-4:] == [28, 29, 30, 31]
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    for layer in range(32):
        expected = "Q6_K" if layer in more else "Q4_K"
        assert (types[f"blk.{layer}.attn_v.weight"], types[f"blk.{layer}.ffn_down.weight"]) == (expected, expected)
        assert types[f"blk.{layer}.attn_q.weight"] == types[f"blk.{layer}.ffn_up.weight"] == "Q4_K"
        assert types[f"blk.{layer}.attn_norm.weight"] == "F32"
    mixtral = ModelShape(arch="llama", n_vocab=32000, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336,
                         n_expert=8, n_expert_used=2)
    moe = {t.name: (t.type_name, t.shape) for t in plan_tensors(mixtral, "Q4_K_M")}
    assert moe["blk.5.attn_v.weight"][0] == moe["blk.5.attn_k.weight"][0] == "Q8_0"  # the 8-expert rule
    assert moe["blk.5.ffn_down_exps.weight"] == ("Q4_K", (14336, 4096, 8))
    assert moe["blk.5.ffn_gate_inp.weight"] == ("F32", (4096, 8))
    odd_rows = ModelShape(arch="llama", n_vocab=49152, n_embd=576, n_layer=2, n_head=9, n_head_kv=3, n_ff=1536)
    assert {t.type_name for t in plan_tensors(odd_rows, "Q4_K_M") if "attn_q." in t.name} == {"Q5_0"}, \
        "576-wide rows do not divide into Q4_K's 256: llama-quantize falls back to Q5_0"


@pytest.mark.parametrize(("config", "published_bytes"), [
    ({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336}, 4_920_734_016),
    ({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 8192, "num_hidden_layers": 80,
      "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672}, 42_520_412_160),
    ({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
      "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944}, 4_683_073_952),
], ids=["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b"])
def test_a_config_json_plans_the_size_of_the_published_q4_k_m_file(config: dict[str, int],
                                                                     published_bytes: int) -> None:
    """Sizes of the Q4_K_M GGUF files published on Hugging Face for these models (the header, mostly the
    tokenizer, is the few MB the plan's tensors leave out)."""
    planned = sum(t.n_bytes for t in plan_tensors(shape_from_hf_config(config), "Q4_K_M"))
    assert 0 < published_bytes - planned < published_bytes / 100, (planned, published_bytes)


@pytest.mark.parametrize("type_name", sorted(_SCALE_FIELDS))
def test_random_blocks_dequantize_to_small_finite_weights(type_name: str) -> None:
    pool = block_pool(type_name, np.random.default_rng(0), pool_bytes=64 * block_size(type_name)[1])
    raw = np.frombuffer(pool, dtype=np.uint8).reshape(-1, block_size(type_name)[1])
    weights = dequantize(raw, GGMLQuantizationType[type_name])
    assert np.isfinite(weights).all() and 0 < float(np.abs(weights).max()) < 1.0
    assert float(weights.std()) > 1e-4, "the quantized values are random, not constant"


def test_a_larger_vocabulary_is_padded_and_a_smaller_one_refused(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "wide.gguf"
    done = synth_cli(str(out), "--arch", "llama", "--vocab", "50000", "--embd", "256", "--layers", "2",
                     "--heads", "4", "--ff", "512", "--type", "Q8_0", "--tokenizer", str(model_path), "--json")
    assert done.returncode == 0, done.stderr
    info = inspect_model(out)
    assert (info.n_vocab, info.synthetic, json.loads(done.stdout)["synthetic"]) == (50000, True, True)
    small = synth_cli(str(tmp_path / "narrow.gguf"), "--arch", "llama", "--vocab", "1000", "--embd", "256",
                      "--layers", "2", "--heads", "4", "--ff", "512", "--tokenizer", str(model_path))
    assert small.returncode == 2 and "smaller than the tokenizer's (49152)" in small.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--hf-config", "{config}"], "architecture 'GPT2LMHeadModel' cannot be synthesized"),
    (["--arch", "llama", "--vocab", "49152", "--embd", "100", "--layers", "2", "--heads", "3", "--ff", "256"],
     "n_embd 100 is not a multiple of n_head 3"),
    (["--arch", "qwen3moe", "--vocab", "49152", "--embd", "256", "--layers", "2", "--heads", "4", "--ff", "256",
      "--experts", "8", "--experts-used", "9"], "9 experts used per token of 8"),
    (["--arch", "llama", "--vocab", "49152", "--embd", "16384", "--layers", "4000", "--heads", "128", "--ff",
      "53248"], "GiB free"),
    (["--arch", "llama", "--vocab", "49152", "--embd", "256"], "needs --layers, --heads, --ff"),
    (["--hf-config", "{config}", "--layers", "4"], "--layers describe a shape only with --arch"),
    (["--like", "{model}", "--type", "Q8_0"], "--type and --tokenizer cannot change a model copied with --like"),
])
def test_bad_shapes_are_refused_before_any_byte_is_written(model_path: Path, tmp_path: Path, args: list[str],
                                                            message: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 50257}))
    out = tmp_path / "out" / "model.gguf"
    done = synth_cli(str(out), *[a.replace("{config}", str(config)).replace("{model}", str(model_path))
                                 for a in args], "--tokenizer", str(model_path))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


def test_an_existing_file_is_kept_unless_forced(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    shutil.copyfile(model_path, out)
    args = [str(out), "--arch", "llama", "--vocab", "49152", "--embd", "256", "--layers", "1", "--heads", "4",
            "--ff", "512", "--type", "Q4_0", "--tokenizer", str(model_path)]
    kept = synth_cli(*args)
    assert kept.returncode == 2 and "exists" in kept.stderr and "--force" in kept.stderr
    assert not inspect_model(out).synthetic
    forced = synth_cli(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert inspect_model(out).synthetic and list(tmp_path.iterdir()) == [out]


def test_the_model_whose_shape_is_copied_is_never_overwritten(model_path: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.gguf"
    shutil.copyfile(model_path, real)
    done = synth_cli(str(real), "--like", str(real), "--force")
    assert done.returncode == 2 and "is the model whose shape synth copies" in done.stderr
    assert not inspect_model(real).synthetic


def test_a_streamed_write_that_fails_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("the disk went away")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
