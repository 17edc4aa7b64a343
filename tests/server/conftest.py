"""Fixtures for tests that run the real llama-server with the real small model.

The binary comes from the build cache and is built at most once per machine: ``make test`` builds it
first (``make llama-server``) and the session fixture reuses that build, or builds it when the tests
run alone. The session's ``LLAMAHOST_HOME`` is a throw-away directory (tests/conftest.py), so the cache
is pointed at the persistent ``LLAMAHOST_SERVER_CACHE`` (default ~/.cache/llamahost/llama-server).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.config import RunConfig
from tuner.server.process import ServerProcess


@pytest.fixture(scope="session")
def server_model(model_path: Path) -> Path:
    """The small real model (SmolLM2-135M Q4_1) from the project's model fetcher."""
    return model_path


@pytest.fixture
def last_cpu() -> int:
    """One CPU this test may pin to (the last allowed one, so pinning is visible on any machine)."""
    return max(os.sched_getaffinity(0))


@pytest.fixture
def small_config(last_cpu: int) -> RunConfig:
    return RunConfig(threads=1, threads_batch=1, cpus=(last_cpu,), placement="compact")


@pytest.fixture
def running_server(llama_server_binary: Path, server_model: Path, small_config: RunConfig) -> Iterator[ServerProcess]:
    with ServerProcess(llama_server_binary, server_model, small_config, ctx_size=1024) as server:
        server.wait_healthy(60)
        yield server
