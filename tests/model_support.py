"""A model description for tests that need its shape, not its file: a 7B Llama at Q4_K_M."""

from __future__ import annotations

from pathlib import Path

from tuner.model.gguf_file import ModelInfo


def a_model(size_bytes: int = 4 * 1024**3) -> ModelInfo:
    return ModelInfo(
        path=Path("/models/m.gguf"), files=(Path("/models/m.gguf"),), size_bytes=size_bytes, gguf_version=3,
        architecture="llama", name="m", file_type="Q4_K_M", dominant_tensor_type="Q4_K", n_params=7_000_000_000,
        n_layers=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim_k=128, head_dim_v=128, context_length=8192,
        expert_count=0, expert_used_count=0, tensor_bytes=size_bytes, bytes_per_token=size_bytes,
    )
