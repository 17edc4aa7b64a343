"""The llama-server build recipe and cache decisions (no compiler run here; tests/server builds for real)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.server import build
from tuner.server.build import (
    MANIFEST_SCHEMA,
    build_percent,
    cache_key,
    cmake_flags,
    find_server,
    install_dir,
    server_cache_root,
)
from tuner.server.source import expected_sha256, pinned_version

CPUINFO_A = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n"
CPUINFO_A_REORDERED = "processor\t: 0\nflags\t\t: avx2 fma fpu avx sse\n"
CPUINFO_B = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma avx512f\n"


def test_portable_flags_are_x86_64_v3_static_and_offline() -> None:
    flags = cmake_flags("portable", "abc1234")
    for wanted in ("-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
                   "-DGGML_AVX512=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_UI=OFF",
                   "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_COMMIT=abc1234"):
        assert wanted in flags
    assert len(flags) == len(set(flags))


def test_native_flags_use_the_building_cpu() -> None:
    flags = cmake_flags("native", "abc1234")
    assert "-DGGML_NATIVE=ON" in flags
    assert not any(flag.startswith("-DGGML_AVX") for flag in flags)
    with pytest.raises(UserError, match="unknown llama-server flavour"):
        cmake_flags("fast", "abc1234")  # type: ignore[arg-type]


def test_native_builds_are_keyed_by_cpu_features() -> None:
    assert cache_key("0.3.36", "portable") == "0.3.36-portable"
    assert cache_key("0.3.36", "native", CPUINFO_A) == cache_key("0.3.36", "native", CPUINFO_A_REORDERED)
    assert cache_key("0.3.36", "native", CPUINFO_A) != cache_key("0.3.36", "native", CPUINFO_B)
    assert cache_key("0.3.36", "native", CPUINFO_A).startswith("0.3.36-native-")


@pytest.mark.parametrize(("line", "percent"), [
    ("[12/240] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o", 5),
    ("[240/240] Linking CXX executable bin/llama-server", 100),
    ("[ 42%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o", 42),
    ("-- Configuring done", None),
])
def test_build_progress_from_ninja_and_make(line: str, percent: int | None) -> None:
    assert build_percent(line) == percent


def test_server_cache_outlives_a_throwaway_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAHOST_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLAMAHOST_SERVER_CACHE", raising=False)
    assert server_cache_root() == tmp_path / "home" / "cache" / "llama-server"
    monkeypatch.setenv("LLAMAHOST_SERVER_CACHE", str(tmp_path / "persistent"))
    assert server_cache_root() == tmp_path / "persistent"
    assert install_dir("portable") == tmp_path / "persistent" / f"{pinned_version()}-portable"


def _fake_entry(directory: Path, **overrides: object) -> None:
    """A cache entry as a finished build leaves it (with /bin/true standing in for the binary)."""
    (directory / "bin").mkdir(parents=True)
    shutil.copy("/bin/true", directory / "bin" / "llama-server")
    manifest = {"schema": MANIFEST_SCHEMA, "llama_cpp_python_version": pinned_version(),
                "source_sha256": expected_sha256(pinned_version()), "llama_cpp_commit": "abc1234",
                "cmake_flags": cmake_flags("portable", "abc1234"), **overrides}
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLAMAHOST_SERVER_CACHE", str(tmp_path))
    return tmp_path


def test_a_complete_entry_is_reused(cache: Path) -> None:
    _fake_entry(install_dir("portable"))
    found = find_server("portable")
    assert found is not None and found.binary == install_dir("portable") / "bin" / "llama-server"


@pytest.mark.parametrize("damage", ["no manifest", "no binary", "other flags", "other source"])
def test_an_incomplete_or_stale_entry_is_not_reused(cache: Path, damage: str) -> None:
    entry = install_dir("portable")
    overrides_by_damage: dict[str, dict[str, object]] = {
        "other flags": {"cmake_flags": ["-DGGML_NATIVE=ON"]},
        "other source": {"source_sha256": "0" * 64},
    }
    overrides = overrides_by_damage.get(damage, {})
    _fake_entry(entry, **overrides)
    if damage == "no manifest":
        (entry / "manifest.json").unlink()
    if damage == "no binary":
        (entry / "bin" / "llama-server").unlink()
    assert find_server("portable") is None
    with pytest.raises(UserError, match="llamahost server build"):
        build.server_binary("portable")


def test_leftovers_of_an_interrupted_build_are_removed(cache: Path) -> None:
    key = install_dir("portable").name
    for name in (f".{key}.build-x1", f".{key}.staging-x2", f".{key}.stale-3", f".{key}-native.build-x4", key):
        (cache / name).mkdir()
    (cache / f".{key}.lock").touch()
    build._remove_leftovers(cache, key)
    assert sorted(p.name for p in cache.iterdir()) == sorted([key, f".{key}.lock", f".{key}-native.build-x4"])


def test_a_new_build_replaces_an_old_entry_whole(cache: Path) -> None:
    final = install_dir("portable")
    _fake_entry(final, llama_cpp_commit="old")
    staged = cache / ".staged"
    _fake_entry(staged, llama_cpp_commit="new")
    build._replace_directory(staged, final)
    assert json.loads((final / "manifest.json").read_text())["llama_cpp_commit"] == "new"
    assert sorted(p.name for p in cache.iterdir()) == [final.name]
