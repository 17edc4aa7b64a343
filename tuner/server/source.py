"""The llama.cpp source that ``llama-server`` is built from: the one vendored by the pinned llama-cpp-python.

Trials measure the ``llama-server`` built from it, and deployments serve that build (or, in the role's
python mode, llama-cpp-python itself): all must run the same llama.cpp, or a tuned configuration is a
guess. So the version comes from one place, :data:`PINNED_VERSION` (the ``binding`` extra in
``pyproject.toml`` pins the same), and the source is that version's sdist from PyPI, whose
``vendor/llama.cpp`` is the full llama.cpp tree. The sdist is checked against a
sha256 recorded here before anything in it is used.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.pip_fetch import pip_download

DISTRIBUTION = "llama-cpp-python"
# The llama.cpp every build and measurement uses: the source vendored in this llama-cpp-python release. The
# `binding` extra in pyproject.toml pins the same version (a unit test keeps the two equal) for the role's
# python mode and the tests that load llama.cpp in-process; the tuner itself needs no Python build of it.
PINNED_VERSION = "0.3.36"
# sha256 of the sdist on PyPI, per version (checked 2026-11-22 against a fresh `pip download`).
SDIST_SHA256: dict[str, str] = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}
# Parts of vendor/llama.cpp that no build step reads (test vocabularies, documentation, images):
# skipping them halves the unpacked size.
UNUSED_TOP_DIRS = frozenset({"models", "docs", "media", "benches"})
_COMMIT_LINE = re.compile(r"update llama\.cpp to ggml-org/llama\.cpp@([0-9a-f]{7,40})")


@dataclass(frozen=True)
class LlamaSource:
    """An unpacked, verified llama.cpp tree and where it came from."""

    version: str  # llama-cpp-python version
    sdist_sha256: str
    llama_cpp_dir: Path
    commit: str  # llama.cpp commit named in the sdist's changelog, "unknown" if none


def pinned_version() -> str:
    """The llama-cpp-python release whose vendored llama.cpp is built, served and measured."""
    return PINNED_VERSION


def expected_sha256(version: str) -> str:
    try:
        return SDIST_SHA256[version]
    except KeyError:
        raise UserError(
            f"no sdist sha256 is recorded for {DISTRIBUTION} {version} (known: {', '.join(SDIST_SHA256)})",
            f"check the sha256 of llama_cpp_python-{version}.tar.gz on PyPI and add it to "
            "SDIST_SHA256 in tuner/server/source.py") from None


def download_sdist(version: str, into: Path) -> Path:
    """Fetch the sdist with pip, which checks the recorded hash (``--require-hashes``)."""
    requirements = into / "requirements.txt"
    requirements.write_text(f"{DISTRIBUTION}=={version} --hash=sha256:{expected_sha256(version)}\n")
    fix = "check access to PyPI, or pass --sdist with a local copy of the file"
    pip_download(["--no-binary", ":all:", "--require-hashes", "-r", str(requirements)], into,
                 what=f"the {DISTRIBUTION} {version} sdist", fix=fix)
    found = sorted(into.glob("*.tar.gz"))
    if len(found) != 1:
        raise UserError(f"pip left {len(found)} sdists for {DISTRIBUTION} {version} in {into}", fix)
    return found[0]


def verify_sdist(path: Path, version: str) -> str:
    """Refuse any file whose sha256 is not the recorded one for ``version``."""
    if not path.is_file():
        raise UserError(f"sdist {path} does not exist", "pass the path of llama_cpp_python-<version>.tar.gz")
    digest = sha256_of(path)
    expected = expected_sha256(version)
    if digest != expected:
        raise UserError(f"{path} has sha256 {digest}, but {DISTRIBUTION} {version} must be {expected}",
                        "download the sdist again from PyPI; do not build from an unverified source")
    return digest


def _wanted(name: str, root: str) -> bool:
    """Keep ``<root>/CHANGELOG.md`` and ``<root>/vendor/llama.cpp/**`` minus directories nothing builds."""
    if name == f"{root}/CHANGELOG.md":
        return True
    prefix = f"{root}/vendor/llama.cpp/"
    if not name.startswith(prefix):
        return False
    top = name[len(prefix):].split("/", 1)[0]
    return top not in UNUSED_TOP_DIRS


def commit_from_changelog(changelog: str, version: str) -> str:
    """The llama.cpp commit the sdist's changelog names under ``## [version]``; "unknown" if none.

    The sdist has no git metadata, so without this the binary would report commit "unknown".
    """
    section = re.search(rf"^## \[{re.escape(version)}\]\s*$(.*?)(?=^## \[|\Z)", changelog, re.M | re.S)
    if section:
        match = _COMMIT_LINE.search(section.group(1))
        if match:
            return match.group(1)
    return "unknown"


def unpack(sdist: Path, version: str, sha256: str, into: Path) -> LlamaSource:
    """Unpack the parts of a verified sdist that the build needs."""
    root = f"llama_cpp_python-{version}"
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            members = [m for m in archive.getmembers() if _wanted(m.name, root)]
            archive.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"could not unpack {sdist}: {exc}", "download the sdist again") from None
    llama_dir = into / root / "vendor" / "llama.cpp"
    if not (llama_dir / "CMakeLists.txt").is_file():
        raise UserError(f"{sdist} has no vendor/llama.cpp source tree", "use the sdist from PyPI")
    changelog = into / root / "CHANGELOG.md"
    commit = commit_from_changelog(changelog.read_text(errors="replace"), version) if changelog.exists() \
        else "unknown"
    return LlamaSource(version=version, sdist_sha256=sha256, llama_cpp_dir=llama_dir, commit=commit)


def fetch_source(version: str, workdir: Path, sdist: Path | None = None) -> LlamaSource:
    """Download (or take ``sdist``), verify and unpack the llama.cpp source for ``version``."""
    if sdist is None:
        download_dir = workdir / "download"
        download_dir.mkdir()
        sdist = download_sdist(version, download_dir)
    digest = verify_sdist(sdist, version)
    unpack_dir = workdir / "source"
    unpack_dir.mkdir()
    return unpack(sdist, version, digest, unpack_dir)
