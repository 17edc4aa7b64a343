"""``llamahost size`` end to end: GGUF files (synthetic ones with a big model's metadata, and the real
small model), explicit parameters, the table, JSON, and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tuner.cli import main
from tuner.model.default_model import default_model_path
from tuner.model.gguf_file import inspect_model
from tuner.sizing import demand_from_gguf

SEVENTY_B = [
    "--params",
    "70.6e9",
    "--bits",
    "4.85",
    "--layers",
    "80",
    "--kv-heads",
    "8",
    "--head-dim",
    "128",
    "--embd",
    "8192",
    "--vocab",
    "128256",
]


def write_gguf(
    path: Path,
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    embd: int,
    vocab: int | None,
    weights_floats: int = 64,
) -> Path:
    """A valid GGUF with a big model's metadata and tiny tensors (weights_floats float32 values)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Synthetic")
    writer.add_block_count(layers)
    writer.add_head_count(kv_heads * 8)
    writer.add_head_count_kv(kv_heads)
    writer.add_embedding_length(embd)
    writer.add_context_length(131072)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if vocab is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((weights_floats // 8, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["size", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_synthetic_gguf_metadata_drives_kv_cache_and_vocab(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "big-meta.gguf", layers=80, kv_heads=8, head_dim=128, embd=8192, vocab=3000)
    model = demand_from_gguf(path)
    assert model.source == "gguf"
    assert model.n_vocab == 3000
    assert model.kv_bytes_per_token("f16") == 80 * 8 * 256 * 2
    assert model.weight_bytes == path.stat().st_size


def test_vocab_falls_back_when_the_file_has_no_tokenizer(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "no-tokenizer.gguf", layers=2, kv_heads=1, head_dim=8, embd=8, vocab=None)
    assert inspect_model(path).n_vocab == 0
    assert demand_from_gguf(path).n_vocab == 262_144


def test_size_from_a_gguf_file_answers_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_gguf(tmp_path / "m.gguf", layers=80, kv_heads=8, head_dim=128, embd=8192, vocab=3000)
    code, report = run_json(capsys, "--model", str(path), "--context", "4096", "--parallel", "2")
    assert code == 0
    assert report["model"]["source"] == "gguf"
    assert report["workload"]["total_context"] == 8192
    assert report["memory_needed"]["kv_cache"] == 80 * 8 * 256 * 2 * 8192
    assert report["recommended"] == "c8g.24xlarge"  # the smallest whole socket, whatever the model
    first = report["candidates"][0]
    assert {
        "fits",
        "placement",
        "bandwidth_gbs",
        "predicted_tg_tokens_per_second",
        "tokens_per_dollar",
        "reasons",
        "isa",
        "numa_nodes",
    } <= set(first)


def test_the_real_small_model_gets_a_sensible_answer(capsys: pytest.CaptureFixture[str]) -> None:
    model_path = default_model_path()
    code, report = run_json(capsys, "--model", str(model_path), "--arch", "x86_64", "--max-price", "0.2")
    assert code == 0
    model = report["model"]
    assert model["n_vocab"] == 49152  # SmolLM2's tokenizer
    assert (model["n_layers"], model["n_head_kv"], model["head_dim_k"]) == (30, 3, 64)
    assert report["memory_needed"]["kv_cache"] == 30 * 3 * 128 * 2 * 8192
    assert report["memory_needed"]["weights"] == model_path.stat().st_size
    best = next(c for c in report["candidates"] if c["instance_type"] == report["recommended"])
    assert best["fits"] and best["price_usd_per_hour"] <= 0.2
    assert best["architecture"] == "x86_64"


def test_table_shows_both_rankings_and_the_recommendation(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *SEVENTY_B, "--name", "Llama-3.1-70B Q4_K_M", "--top", "3")
    assert code == 0
    assert "By predicted generation speed" in out
    assert "By tokens per dollar" in out
    assert "Recommended: c8g.24xlarge" in out
    assert "owns one whole socket" in out
    assert "c8g.48xlarge" in out and "spans 2" in out  # fastest, but flagged


def test_efficiency_option_replaces_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    _, default = run_json(capsys, *SEVENTY_B)
    _, measured = run_json(capsys, *SEVENTY_B, "--efficiency", "0.7")
    assert measured["assumptions"]["efficiency"] == 0.7

    def tg(report: dict[str, Any]) -> float:
        return float(
            next(
                c["predicted_tg_tokens_per_second"]
                for c in report["candidates"]
                if c["instance_type"] == "r7a.24xlarge"
            )
        )

    assert tg(measured) == pytest.approx(tg(default) * 0.7 / 0.6, rel=1e-3)


def test_price_override_and_cap(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(
        capsys, *SEVENTY_B, "--family", "r7i", "--price", "r7i.24xlarge=1.5", "--max-price", "2"
    )
    assert code == 0
    assert report["recommended"] == "r7i.24xlarge"
    chosen = next(c for c in report["candidates"] if c["instance_type"] == "r7i.24xlarge")
    assert chosen["price_basis"] == "given on the command line"


def test_fits_nowhere_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "--params", "2e12", "--bits", "16", "--layers", "120", "--kv-heads", "16", "--head-dim", "128"
    )
    assert code == 1
    assert "No size fits" in out
    assert "does not fit in any size" in err
    code, report = run_json(
        capsys, "--params", "2e12", "--bits", "16", "--layers", "120", "--kv-heads", "16", "--head-dim", "128"
    )
    assert code == 1
    assert report["recommended"] is None
    assert not any(c["fits"] for c in report["candidates"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "x.gguf", "--params", "7e9"], "--model and --params both describe the model"),
        (["--params", "7e9", "--bits", "4"], "missing --layers, --kv-heads, --head-dim"),
        ([*SEVENTY_B, "--price", "r7a.24xlarge"], "is not TYPE=USD"),
        ([*SEVENTY_B, "--family", "m5"], "unknown families m5"),
        ([*SEVENTY_B, "--efficiency", "60"], "efficiency 60.0 must be in"),
        ([*SEVENTY_B, "--context", "0"], "context 0 must be at least 1"),
        (["--model", "/nonexistent/model.gguf"], "model file not found"),
    ],
)
def test_bad_input_exits_2_with_problem_and_fix(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "fix:" in err
    assert "Traceback" not in err and not out
