"""The tiny test model with the real llama.cpp: llama-server serves it over HTTP, whole and split.

The tiny model (tuner.model.tiny) exists for hosts where the default model is too slow, e.g. under QEMU TCG;
these tests prove that the real llama.cpp accepts it and generates exactly the requested tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tuner.config import RunConfig
from tuner.model.gguf_file import inspect_model
from tuner.server.client import complete, health
from tuner.server.process import ServerProcess

pytestmark = pytest.mark.server

N_PREDICT = 16


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path) -> Path:
    return tiny_model_path


def test_llama_server_generates_the_requested_tokens(llama_server_binary: Path, tiny: Path,
                                                     small_config: RunConfig) -> None:
    with ServerProcess(llama_server_binary, tiny, small_config, ctx_size=256) as server:
        load_s = server.wait_healthy(60)
        assert health(server.base_url) == 200
        started = time.perf_counter()
        result = complete(server.base_url, "The capital of France is", N_PREDICT, ignore_eos=True,
                          cache_prompt=False)
        request_s = time.perf_counter() - started
    timings = result.timings
    print(f"tiny model {tiny.name} ({tiny.stat().st_size} bytes): healthy after {load_s:.2f} s, one request of "
          f"{timings.prompt_n} prompt + {timings.predicted_n} generated tokens took {request_s:.3f} s "
          f"(server: prompt {timings.prompt_ms:.1f} ms, generation {timings.predicted_ms:.1f} ms)")
    assert timings.predicted_n == N_PREDICT  # ignore_eos: exactly n_predict tokens
    assert timings.prompt_n > 1  # the real tokenizer split the prompt
    assert timings.predicted_ms > 0 and timings.predicted_per_second > 0
    assert 0 < result.total_s <= request_s


def test_llama_server_serves_a_split_model_from_its_first_shard(llama_server_binary: Path,
                                                               tiny_split_model_path: Path, tiny: Path,
                                                               small_config: RunConfig) -> None:
    """Split as gguf-split splits: the shards together hold the tiny model's tensors, and llama-server, given
    the first shard, finds the second beside it and generates."""
    model = inspect_model(tiny_split_model_path)
    assert [f.name[-20:] for f in model.files] == ["-00001-of-00002.gguf", "-00002-of-00002.gguf"]
    assert sum(f.stat().st_size for f in model.files) > tiny.stat().st_size  # a header per shard
    with ServerProcess(llama_server_binary, tiny_split_model_path, small_config, ctx_size=256) as server:
        server.wait_healthy(60)
        result = complete(server.base_url, "The capital of France is", 4, ignore_eos=True, cache_prompt=False)
    assert result.timings.predicted_n == 4
