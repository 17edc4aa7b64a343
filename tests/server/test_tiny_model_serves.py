"""The tiny test model with the real llama.cpp: llama-server serves it over HTTP, whole and split.

The tiny model (tuner.model.tiny) exists for hosts where the default model is too slow, e.g. under QEMU TCG;
these tests prove that the real llama.cpp accepts it and generates exactly the requested tokens.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.model.gguf_file import inspect_model
from tuner.server.client import complete, health
from tuner.server.process import ServerProcess, free_port, server_environment

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


@pytest.mark.parametrize("parallel", [1, 3, -1])
def test_the_least_batch_size_is_the_one_llama_server_starts_with(llama_server_binary: Path, tiny: Path,
                                                                  small_config: RunConfig, parallel: int) -> None:
    """RunConfig.least_batch_size, held against the real llama-server: with it the server starts and answers;
    with one token less it aborts at start, and llamahost refuses that configuration before starting anything."""
    least = dataclasses.replace(small_config, parallel=parallel, ubatch_size=1, batch_size=2).least_batch_size()
    fits = dataclasses.replace(small_config, parallel=parallel, ubatch_size=1, batch_size=least)
    with ServerProcess(llama_server_binary, tiny, fits, ctx_size=256 * max(parallel, 4)) as server:
        server.wait_healthy(60)
        assert complete(server.base_url, "The capital of France is", 2, ignore_eos=True,
                        cache_prompt=False).timings.predicted_n == 2
    too_small = dataclasses.replace(fits, batch_size=least - 1)
    with pytest.raises(UserError, match=f"batch_size {least - 1} is below {least}"):
        ServerProcess(llama_server_binary, tiny, too_small)
    unchecked = [str(llama_server_binary), "--model", str(tiny), "--host", "127.0.0.1", "--port", str(free_port()),
                 "--ctx-size", str(256 * max(parallel, 4)), *too_small.server_args()]
    aborted = subprocess.run(unchecked, capture_output=True, text=True, timeout=120, check=False,
                             env=server_environment(dict(os.environ)))
    # llama.cpp aborts: a one-token batch cannot hold its start-up check's two tokens (get_sub_batch), and a
    # batch below the slots fails its n_outputs_max assertion
    assert aborted.returncode == -signal.SIGABRT, aborted.stderr[-2000:]
    assert "get_sub_batch" in aborted.stderr or "n_outputs_max" in aborted.stderr, aborted.stderr[-2000:]
