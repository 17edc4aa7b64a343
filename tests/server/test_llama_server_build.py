"""The built llama-server: pinned source, runtime dependencies, ISA, cache reuse, flags of this version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_support import session_processes

from tuner.config import CACHE_TYPES, FLASH_ATTN, LOAD_MODES, NUMA_MODES, RunConfig
from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.server import source
from tuner.server.build import ServerBuild, ensure_server
from tuner.server.flags import check_flags, server_flags
from tuner.server.libraries import debian_packages, disallowed, parse_ldd
from tuner.server.process import ServerProcess
from tuner.server.source import SDIST_SHA256, pinned_version

pytestmark = pytest.mark.server


def test_manifest_records_the_pinned_source_and_the_binary(llama_server_build: ServerBuild) -> None:
    manifest = llama_server_build.manifest
    version = pinned_version()
    assert manifest["llama_cpp_python_version"] == version
    assert manifest["source_sha256"] == SDIST_SHA256[version]
    assert manifest["binary_sha256"] == sha256_of(llama_server_build.binary)
    assert "-DBUILD_SHARED_LIBS=OFF" in manifest["cmake_flags"]
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in manifest["cmake_flags"]
    shown = subprocess.run([llama_server_build.binary, "--version"], capture_output=True, text=True,
                           check=True, timeout=30)
    assert f"commit {manifest['llama_cpp_commit']}" in shown.stdout + shown.stderr
    assert manifest["llama_cpp_commit"] != "unknown"


def test_binary_needs_only_the_c_cxx_and_openmp_runtime(llama_server_binary: Path) -> None:
    ldd = subprocess.run(["ldd", llama_server_binary], capture_output=True, text=True, check=True, timeout=30)
    libraries = parse_ldd(ldd.stdout)
    assert disallowed(libraries) == []
    assert set(debian_packages(libraries)) <= {"libc6", "libgcc-s1", "libgomp1", "libstdc++6"}
    assert not any(name in ldd.stdout for name in ("libssl", "libcurl", "libcrypto", "libggml", "libllama"))


def test_portable_binary_uses_avx2_and_fma_but_no_avx512(llama_server_binary: Path) -> None:
    # QEMU's TCG emulates AVX2/FMA/F16C (7.2+) but no AVX-512: a zmm register would crash the lab host.
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", llama_server_binary],
                                 capture_output=True, text=True, check=True, timeout=120).stdout
    assert "%ymm" in disassembly
    assert "vfmadd" in disassembly
    assert "%zmm" not in disassembly


def test_a_second_build_is_a_no_op(llama_server_build: ServerBuild) -> None:
    mtime = llama_server_build.binary.stat().st_mtime_ns
    started = time.monotonic()
    again = ensure_server("portable")
    assert time.monotonic() - started < 5
    assert again.binary == llama_server_build.binary
    assert again.binary.stat().st_mtime_ns == mtime


def test_flag_renames_of_this_llama_cpp(llama_server_binary: Path) -> None:
    flags = server_flags(llama_server_binary)
    assert "--mlock" not in flags and "--no-mmap" not in flags  # replaced by --load-mode
    assert set(LOAD_MODES) <= set(flags["--load-mode"].choices)
    assert flags["-fa"].choices == ("on", "off", "auto")
    assert set(flags["--cache-type-k"].choices) == set(CACHE_TYPES)
    assert {mode for mode in NUMA_MODES if mode != "none"} <= set(flags["--numa"].choices)
    assert flags["--api-key-file"].arity == 1
    assert flags["--no-cont-batching"] is flags["--cont-batching"]


def _configs_covering_every_value() -> list[RunConfig]:
    base = RunConfig(threads=2, threads_batch=2)
    configs = [base.with_changes(numa=mode) for mode in NUMA_MODES]
    configs += [base.with_changes(load_mode=mode) for mode in LOAD_MODES]
    configs += [base.with_changes(flash_attn=mode) for mode in FLASH_ATTN]
    configs += [base.with_changes(cache_type_k=kind, cache_type_v=kind, flash_attn="on") for kind in CACHE_TYPES]
    configs += [base.with_changes(parallel=4, cont_batching=False, batch_size=512, ubatch_size=128)]
    return [config.validate() for config in configs]


@pytest.mark.parametrize("config", _configs_covering_every_value(), ids=lambda c: c.key()[:60])
def test_every_flag_a_run_config_renders_is_accepted(llama_server_binary: Path, config: RunConfig,
                                                     tmp_path: Path) -> None:
    server = ServerProcess(llama_server_binary, tmp_path / "m.gguf", config, ctx_size=512,
                           api_key_file=tmp_path / "key")
    check_flags(llama_server_binary, server.server_args(port=8080))


def test_build_refuses_a_tampered_sdist_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMAHOST_SERVER_CACHE", str(cache))
    tampered = tmp_path / "llama_cpp_python.tar.gz"
    tampered.write_bytes(b"not the sdist")
    with pytest.raises(UserError, match="sha256"):
        ensure_server("portable", sdist=tampered)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []


def test_build_without_cmake_fails_before_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAHOST_SERVER_CACHE", str(tmp_path / "cache"))
    bare = tmp_path / "empty-bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    started = time.monotonic()
    with pytest.raises(UserError, match="cmake"):
        ensure_server("portable")
    assert time.monotonic() - started < 5
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []


def test_pip_refuses_an_sdist_whose_hash_is_not_the_recorded_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    version = pinned_version()
    monkeypatch.setitem(source.SDIST_SHA256, version, "0" * 64)
    with pytest.raises(UserError, match="DO NOT MATCH THE HASHES"):
        source.download_sdist(version, tmp_path)
    assert list(tmp_path.glob("*.tar.gz")) == []


def test_an_interrupted_build_stops_its_compilers_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "server-cache"
    env = {**os.environ, "LLAMAHOST_SERVER_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    build = subprocess.Popen([sys.executable, "-m", "tuner.cli", "server", "build", "--jobs", "1"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert build.stdout is not None
        for line in build.stdout:
            if "compiling" in line:
                break
        else:
            pytest.fail(f"the build ended before compiling (exit {build.wait()})")
        time.sleep(2)  # let ninja start a compiler
        assert session_processes(str(cache)), "no compiler was running"
        build.send_signal(signal.SIGTERM)
        assert build.wait(timeout=60) == 143
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    deadline = time.monotonic() + 10  # SIGKILLed compilers take a moment to go
    while session_processes(str(cache)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_processes(str(cache)) == []
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == []
