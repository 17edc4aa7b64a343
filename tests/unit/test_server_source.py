"""Which llama.cpp the server is built from: pin, sdist check, unpacking (no network)."""

from __future__ import annotations

import io
import tarfile
import tomllib
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.server import source
from tuner.server.source import commit_from_changelog, pinned_version, unpack, verify_sdist

CHANGELOG = """\
## [Unreleased]

## [0.3.36]

- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098

## [0.3.35]

- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f
"""


def test_one_pin_the_binding_extra_agrees_and_its_sdist_hash_is_recorded() -> None:
    """The built, served and measured llama.cpp is PINNED_VERSION's; the `binding` extra (the in-process
    benchmark) must pin the same release, and nothing else in the project may depend on llama-cpp-python."""
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["binding"] == [f"llama-cpp-python=={pinned_version()}"]
    assert not [d for d in project["dependencies"] if d.startswith("llama-cpp-python")], "the tuner compiles nothing"
    assert len(source.expected_sha256(pinned_version())) == 64


def test_unknown_version_has_no_hash() -> None:
    with pytest.raises(UserError, match="no sdist sha256 is recorded"):
        source.expected_sha256("0.0.1")


def test_commit_comes_from_the_versions_own_changelog_section() -> None:
    assert commit_from_changelog(CHANGELOG, "0.3.36") == "0c1e57098"
    assert commit_from_changelog(CHANGELOG, "0.3.35") == "4df29be4f"
    assert commit_from_changelog(CHANGELOG, "0.3.37") == "unknown"


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_unpack_keeps_the_llama_cpp_tree_without_unused_parts(tmp_path: Path) -> None:
    root = "llama_cpp_python-9.9.9"
    sdist = _tarball(tmp_path / "s.tar.gz", {
        f"{root}/CHANGELOG.md": CHANGELOG.replace("0.3.36", "9.9.9").encode(),
        f"{root}/vendor/llama.cpp/CMakeLists.txt": b"project(x)",
        f"{root}/vendor/llama.cpp/ggml/src/ggml.c": b"int x;",
        f"{root}/vendor/llama.cpp/models/ggml-vocab-llama.gguf": b"big",
        f"{root}/llama_cpp/__init__.py": b"",
    })
    out = tmp_path / "out"
    out.mkdir()
    unpacked = unpack(sdist, "9.9.9", "digest", out)
    assert unpacked.commit == "0c1e57098"
    assert (unpacked.llama_cpp_dir / "ggml" / "src" / "ggml.c").is_file()
    assert not (unpacked.llama_cpp_dir / "models").exists()
    assert not (out / root / "llama_cpp").exists()


def test_an_sdist_without_llama_cpp_is_refused(tmp_path: Path) -> None:
    sdist = _tarball(tmp_path / "s.tar.gz", {"llama_cpp_python-9.9.9/README.md": b"hi"})
    with pytest.raises(UserError, match=r"no vendor/llama\.cpp"):
        unpack(sdist, "9.9.9", "digest", tmp_path)


def test_verify_refuses_a_file_with_another_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.tar.gz"
    good.write_bytes(b"the real bytes")
    monkeypatch.setitem(source.SDIST_SHA256, "9.9.9", sha256_of(good))
    assert verify_sdist(good, "9.9.9") == sha256_of(good)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"other bytes")
    with pytest.raises(UserError, match="must be"):
        verify_sdist(bad, "9.9.9")
    with pytest.raises(UserError, match="does not exist"):
        verify_sdist(tmp_path / "missing.tar.gz", "9.9.9")
