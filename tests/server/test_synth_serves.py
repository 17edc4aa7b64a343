"""Synthetic models (`llamahost model synth`) in the real llama.cpp: each loads and generates.

The twin of the bundled model, a dense llama from explicit dimensions (its vocabulary padded past the
tokenizer's) and a Qwen3 mixture-of-experts: llama-server must accept the tensor table, the types and the
metadata synth writes, and generate tokens from random weights without failing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.config import RunConfig
from tuner.model.gguf_file import inspect_model
from tuner.model.synth import plan_from_header, plan_from_shape, write_synthetic
from tuner.model.synth_shape import ModelShape
from tuner.server.client import complete
from tuner.server.process import ServerProcess

pytestmark = pytest.mark.server

SHAPES = {
    "dense-llama-q4km": (ModelShape(arch="llama", n_vocab=50000, n_embd=256, n_layer=2, n_head=4, n_head_kv=2,
                                    n_ff=512, name="dense"), "Q4_K_M"),
    "qwen3-moe-q4km": (ModelShape(arch="qwen3moe", n_vocab=49152, n_embd=256, n_layer=2, n_head=4, n_head_kv=2,
                                  n_ff=512, head_dim=64, n_expert=8, n_expert_used=2, n_ff_expert=256,
                                  name="moe"), "Q4_K_M"),
    "mixtral-like-q8": (ModelShape(arch="llama", n_vocab=49152, n_embd=256, n_layer=2, n_head=4, n_head_kv=4,
                                   n_ff=256, n_expert=4, n_expert_used=2, name="mixtral"), "Q8_0"),
}


def generates(binary: Path, model: Path, config: RunConfig) -> int:
    with ServerProcess(binary, model, config, ctx_size=256) as server:
        server.wait_healthy(60)
        result = complete(server.base_url, "The capital of France is", 4, ignore_eos=True, cache_prompt=False)
    return result.timings.predicted_n


def test_the_bundled_models_twin_generates(llama_server_binary: Path, model_path: Path, tmp_path: Path,
                                           small_config: RunConfig) -> None:
    twin = write_synthetic(plan_from_header(model_path), tmp_path / "twin.gguf")
    assert generates(llama_server_binary, twin, small_config) == 4


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_a_synthetic_shape_loads_and_generates(name: str, llama_server_binary: Path, model_path: Path,
                                               tmp_path: Path, small_config: RunConfig) -> None:
    shape, file_type = SHAPES[name]
    model = write_synthetic(plan_from_shape(shape, file_type, tokenizer=model_path), tmp_path / f"{name}.gguf")
    info = inspect_model(model)
    assert (info.synthetic, info.n_vocab, info.expert_count) == (True, shape.n_vocab, shape.n_expert)
    assert generates(llama_server_binary, model, small_config) == 4
