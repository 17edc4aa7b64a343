"""Name a llama-server build by what it is: its sha256, its version line and the CPU features it runs with.

A tuned configuration is only worth rolling out onto the build it was measured on: the fastest batch size
and thread count depend on which kernels run (AVX2 or AVX-512, repacked weights or not). So every trial
records the binary it ran, and write-back compares that record with the binary the role deploys.

llama.cpp prints its ``system_info`` line (the compiled-in and, in ``GGML_BACKEND_DL`` builds, the loaded
CPU backend's features) only at debug verbosity, before it opens the model. Starting the binary with
``-lv 4`` and a model path that does not exist prints exactly that line and exits in milliseconds, so the
identity costs no model load and no server start.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.model.checksum import cached_sha256
from tuner.server.cpu_features import parse_system_info

_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerBinary:
    """One llama-server build as a result names it."""

    path: str
    sha256: str
    version: str  # e.g. "version: 0.5.0-dev (build 0, commit 0c1e57098)"
    system_info: str  # e.g. "CPU : SSE3 = 1 | AVX2 = 1 | ... | OPENMP = 1 | REPACK = 1 |"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "version": self.version, "system_info": self.system_info}


def probe_commands(binary: str, missing_model: str) -> tuple[list[str], list[str]]:
    """The two commands whose output names a build: ``--version``, and a debug start that prints
    ``system_info`` and stops at once on a model path that does not exist (run here, or on a host over SSH)."""
    return [binary, "--version"], [binary, "-lv", "4", "--model", missing_model, "--host", "127.0.0.1",
                                   "--port", "0"]


def identity_of(path: str, sha256: str, version_output: str, debug_output: str) -> ServerBinary:
    """A :class:`ServerBinary` from what :func:`probe_commands` printed (no I/O)."""
    version = next((line.strip() for line in version_output.splitlines() if line.startswith("version")), "")
    if not version:
        raise UserError(f"{path} does not answer --version like llama-server",
                        "point --server-binary at a llama-server binary (or run `llamahost server build`)")
    return ServerBinary(path=path, sha256=sha256, version=version, system_info=parse_system_info(debug_output))


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=_TIMEOUT_S,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"could not run {command[0]}: {exc}",
                        "point --server-binary at a working llama-server (or run `llamahost server build`)") from None
    return done.stdout + done.stderr


@functools.lru_cache(maxsize=8)
def _identify(path: str, _size: int, _mtime_ns: int) -> ServerBinary:
    with tempfile.TemporaryDirectory(prefix="llamahost-identify-") as scratch:
        version_command, debug_command = probe_commands(path, str(Path(scratch) / "no-model.gguf"))
        version_output = _run(version_command)
        debug_output = _run(debug_command)
    return identity_of(path, cached_sha256(Path(path)), version_output, debug_output)


def identify(binary: Path) -> ServerBinary:
    """The identity of ``binary`` (cached per path, size and modification time)."""
    resolved = Path(binary).resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise UserError(f"llama-server binary {binary} cannot be read: {exc.strerror}",
                        "build it with `llamahost server build`, or pass an existing --server-binary") from None
    return _identify(str(resolved), stat.st_size, stat.st_mtime_ns)
