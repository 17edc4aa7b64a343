"""A llama-server build is named by content: sha256, version line and the CPU features llama.cpp reports.

A stand-in binary (a shell script that answers like llama-server) keeps this tier free of the real build;
tests/tuning checks the real build's identity against its build manifest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.server.build import deployed_server_binary
from tuner.server.cpu_features import parse_system_info
from tuner.server.identity import identify

LOG = ("0.00.001.676 I srv  llama_server: initializing ...\n"
       "0.00.003.540 I cmn  common_param: system_info: n_threads = 2 (n_threads_batch = 2) / 2 | "
       "CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 |\n"
       "0.00.005.384 E gguf_init_from_file: failed to open GGUF file\n")


def test_the_feature_list_is_kept_and_the_thread_counts_of_one_run_are_not() -> None:
    assert parse_system_info(LOG) == "CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 |"
    assert parse_system_info("no such line\n") == ""


def stand_in(tmp_path: Path, *, version: str, info: str) -> Path:
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\n"
                      f'if [ "$1" = --version ]; then echo "{version}" >&2; exit 0; fi\n'
                      f'echo "0.00.003 I cmn  common_param: system_info: n_threads = 4 / 4 | {info}" >&2\n'
                      "exit 1\n")
    script.chmod(0o755)
    return script


def test_a_build_is_named_by_its_sha256_version_and_cpu_features(tmp_path: Path) -> None:
    binary = stand_in(tmp_path, version="version: 7 (build 0, commit abc)", info="CPU : AVX512 = 1 |")
    server = identify(binary)
    assert server.sha256 == sha256_of(binary)
    assert server.version == "version: 7 (build 0, commit abc)"
    assert server.system_info == "CPU : AVX512 = 1 |"
    assert server.to_dict()["path"] == str(binary.resolve())


def test_a_rebuilt_binary_at_the_same_path_is_identified_again(tmp_path: Path) -> None:
    binary = stand_in(tmp_path, version="version: 7", info="CPU : AVX2 = 1 |")
    first = identify(binary)
    stand_in(tmp_path, version="version: 8 (a rebuilt one)", info="CPU : AVX2 = 1 |")
    second = identify(binary)
    assert second.version == "version: 8 (a rebuilt one)" and second.sha256 != first.sha256


def test_something_that_is_not_llama_server_is_refused_with_the_fix(tmp_path: Path) -> None:
    not_it = tmp_path / "true"
    not_it.write_text("#!/bin/sh\nexit 0\n")
    not_it.chmod(0o755)
    with pytest.raises(UserError, match="does not answer --version like llama-server") as refused:
        identify(not_it)
    assert "llamahost server build" in str(refused.value.fix)
    with pytest.raises(UserError, match="cannot be read"):
        identify(tmp_path / "missing")


def test_on_a_host_the_role_prepared_trials_run_the_binary_it_serves(tmp_path: Path) -> None:
    """Fleet hosts measure the bytes the role installed (one sha256 across the group), not a build of their own."""
    served = stand_in(tmp_path, version="version: 7", info="CPU : AVX2 = 1 |")
    assert deployed_server_binary(served) == served
