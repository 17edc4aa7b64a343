"""Build ``llama-server`` from the pinned llama.cpp source, once, into a cache that hosts can copy from.

Why a build of our own: llama-cpp-python ships only the libraries, and a ``llama-server`` from anywhere
else would run a different llama.cpp than the one the tuner measured. The result is cached under
``<server cache>/<llama-cpp-python version>-<flavour>/`` with ``bin/llama-server`` and ``manifest.json``
(source sha256, cmake flags, build time, ``--version`` and ``ldd`` output), so a second call is a no-op.

Flavours: ``portable`` (x86-64-v3: AVX2, FMA, F16C, BMI2, no AVX-512) runs on this machine, on any recent
server CPU, and inside a QEMU >= 7.2 TCG guest; ``native`` uses every extension of the building CPU and
is keyed by that CPU's feature flags, so a cache shared between different machines never hands one
machine another's native binary.

The build is offline once the sdist is here (no web UI download, no OpenSSL/curl) and static in
llama.cpp's own libraries, so the binary depends only on libc, libm, libstdc++, libgcc_s and libgomp.
It runs in a hidden directory next to its destination and is renamed into place at the end, under a
lock, so an interrupted or concurrent build never leaves a half directory behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from tuner.atomic import write_atomic
from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.paths import cache_dir
from tuner.server.libraries import LinkedLibrary, debian_packages, disallowed, glibc_required, parse_ldd
from tuner.server.source import LlamaSource, expected_sha256, fetch_source, pinned_version

Flavour = Literal["portable", "native"]
FLAVOURS: tuple[str, ...] = get_args(Flavour)
Progress = Callable[[str], None]

MANIFEST_SCHEMA = 1
BINARY_NAME = "llama-server"
TARGET = "llama-server"
_TEMP_PREFIX = "."  # staging, build and stale directories are hidden, and removed by the next build

# Offline, server-only, static llama.cpp libraries. OpenMP stays on, as in llama-cpp-python's libggml-cpu
# (the role's python mode): one threading model whichever way a host serves.
COMMON_CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server lives under tools/
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # otherwise the build downloads the web UI from Hugging Face
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CCACHE=OFF",
    "-DGGML_OPENMP=ON",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
)
# x86-64-v3. QEMU's TCG emulates AVX2/FMA/F16C since 7.2 but no AVX-512, AVX-VNNI or AMX.
PORTABLE_CMAKE_FLAGS: tuple[str, ...] = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_SSE42=ON",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX_VNNI=OFF",
    "-DGGML_AVX512=OFF",
    "-DGGML_AVX512_VBMI=OFF",
    "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
)
NATIVE_CMAKE_FLAGS: tuple[str, ...] = ("-DGGML_NATIVE=ON",)
TOOL_TIMEOUT_S = 60


@dataclass(frozen=True)
class ServerBuild:
    """A finished, verified ``llama-server`` in the cache."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def binary(self) -> Path:
        return self.directory / "bin" / BINARY_NAME

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"


# ---- pure logic -------------------------------------------------------------------------------------


def cmake_flags(flavour: Flavour, commit: str) -> list[str]:
    """The complete ``-D`` list for one flavour; recorded in the manifest and compared on reuse."""
    if flavour not in FLAVOURS:
        raise UserError(f"unknown llama-server flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    isa = PORTABLE_CMAKE_FLAGS if flavour == "portable" else NATIVE_CMAKE_FLAGS
    return [*COMMON_CMAKE_FLAGS, *isa, f"-DLLAMA_BUILD_COMMIT={commit}"]


def cpu_flags_digest(cpuinfo: str) -> str:
    """Eight hex digits naming the ISA extensions of the first CPU in ``/proc/cpuinfo``."""
    match = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    flags = " ".join(sorted(match.group(1).split())) if match else ""
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def cache_key(version: str, flavour: Flavour, cpuinfo: str = "") -> str:
    if flavour == "native":
        return f"{version}-native-{cpu_flags_digest(cpuinfo)}"
    return f"{version}-{flavour}"


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]")


def build_percent(line: str) -> int | None:
    """Progress in percent from one line of ninja (``[12/340]``) or make (``[ 42%]``) output."""
    match = _NINJA_STEP.match(line)
    if match:
        done, total = int(match.group(1)), int(match.group(2))
        return 100 * done // total if total else None
    match = _MAKE_STEP.match(line)
    return int(match.group(1)) if match else None


def default_jobs() -> int:
    """Every CPU this process may run on."""
    return len(os.sched_getaffinity(0))


# ---- the cache --------------------------------------------------------------------------------------


def server_cache_root() -> Path:
    """Where built servers live. ``LLAMAHOST_SERVER_CACHE`` lets CI keep one build across test sessions
    even when ``LLAMAHOST_HOME`` points at a throw-away directory."""
    override = os.environ.get("LLAMAHOST_SERVER_CACHE")
    return Path(override) if override else cache_dir() / "llama-server"


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def install_dir(flavour: Flavour = "portable", version: str | None = None) -> Path:
    version = version or pinned_version()
    return server_cache_root() / cache_key(version, flavour, _read_cpuinfo() if flavour == "native" else "")


def _load_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(build: ServerBuild, version: str, flavour: Flavour) -> bool:
    """A cached build is reused only if it is complete and made from the same source and recipe."""
    manifest = build.manifest
    return (
        manifest.get("schema") == MANIFEST_SCHEMA
        and manifest.get("llama_cpp_python_version") == version
        and manifest.get("source_sha256") == expected_sha256(version)
        and manifest.get("cmake_flags") == cmake_flags(flavour, str(manifest.get("llama_cpp_commit")))
        and build.binary.is_file()
        and os.access(build.binary, os.X_OK)
    )


def find_server(flavour: Flavour = "portable") -> ServerBuild | None:
    """The cached build for the pinned version and ``flavour``, or None when there is none (or it is stale)."""
    version = pinned_version()
    directory = install_dir(flavour, version)
    manifest = _load_manifest(directory)
    if manifest is None:
        return None
    build = ServerBuild(directory=directory, manifest=manifest)
    return build if _is_current(build, version, flavour) else None


def server_binary(flavour: Flavour = "portable") -> Path:
    """Path of the built binary; a clear error when it has not been built yet."""
    build = find_server(flavour)
    if build is None:
        how = "`llamahost server build --native`" if flavour == "native" else \
            "`llamahost server build` (or `make llama-server`)"
        raise UserError(f"no {flavour} llama-server has been built for llama-cpp-python {pinned_version()} "
                        f"(looked in {install_dir(flavour)})", f"run {how}")
    return build.binary


# Where the llama_server role installs the server (its default llama_server_prefix, vars/main.yml).
ROLE_SERVED_BINARY = Path("/opt/llama-server/bin/llama-server")


def deployed_server_binary(served: Path = ROLE_SERVED_BINARY) -> Path:
    """What benchmark trials run when no --server-binary is given: the build that serves.

    On a host the llama_server role prepared, that is the binary it installed (a copy of the controller's
    portable build in binary mode, the host's own build in source mode), so fleet hosts all measure the same
    bytes and a result's build is the one write-back compares. Elsewhere it is the portable build the role
    would deploy, built on first use (about 13 min on 2 cores, with progress on stderr), then cached."""
    if served.is_file() and os.access(served, os.X_OK):
        return served
    return ensure_server("portable", progress=lambda message: print(f"llama-server: {message}", file=sys.stderr,
                                                                    flush=True)).binary


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """One builder per cache entry at a time; the kernel drops the lock if the holder dies."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{key}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path, key: str) -> None:
    """Directories an interrupted build left behind (we hold the lock, so none is in use)."""
    for path in root.glob(f"{_TEMP_PREFIX}{key}.*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _replace_directory(staged: Path, final: Path) -> None:
    """Move a complete build into place; an older entry is moved aside first, then removed."""
    if final.exists():
        stale = final.with_name(f"{_TEMP_PREFIX}{final.name}.stale-{os.getpid()}")
        os.rename(final, stale)
        os.rename(staged, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(staged, final)


# ---- running the build ------------------------------------------------------------------------------


def _require_tools() -> tuple[str, str]:
    """cmake, and the generator to use (ninja when installed, else make)."""
    cmake = shutil.which("cmake")
    compiler = shutil.which("c++") or shutil.which("g++")
    if cmake is None or compiler is None:
        raise UserError("building llama-server needs cmake and a C++ compiler",
                        "install them: apt-get install cmake g++ (or run .ci/system-deps.sh)")
    if shutil.which("ninja"):
        return cmake, "Ninja"
    if shutil.which("make"):
        return cmake, "Unix Makefiles"
    raise UserError("building llama-server needs ninja or make", "install one: apt-get install ninja-build")


def _run_logged(cmd: list[str], log: Path, env: dict[str, str], on_line: Callable[[str], None]) -> None:
    """Run a build step, appending its output to ``log`` and passing each line to ``on_line``."""
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        # its own process group, so an interruption stops cmake, ninja and every compiler at once
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sink.write(line)
                on_line(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet: the group is ours
            proc.wait()
            raise
    if code != 0:
        raise _BuildFailed(f"`{' '.join(cmd[:3])} ...` exited with {code}")


class _BuildFailed(Exception):
    pass


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _compile(source: LlamaSource, flags: list[str], build_dir: Path, jobs: int, log: Path,
             progress: Progress) -> Path:
    cmake, generator = _require_tools()
    env = dict(os.environ)
    # The unpacked tree has no git metadata; keep git from describing whatever repository holds the cache.
    env["GIT_CEILING_DIRECTORIES"] = str(source.llama_cpp_dir.parent)
    progress(f"configuring llama.cpp {source.commit} ({generator})")
    _run_logged([cmake, "-S", str(source.llama_cpp_dir), "-B", str(build_dir), "-G", generator, *flags],
                log, env, lambda _line: None)
    progress(f"compiling {TARGET} with {jobs} jobs")
    last = [-10]

    def report(line: str) -> None:
        percent = build_percent(line)
        if percent is not None and percent >= last[0] + 10:
            last[0] = percent - percent % 10
            progress(f"compiling: {percent}%")

    _run_logged([cmake, "--build", str(build_dir), "--target", TARGET, "--parallel", str(jobs)],
                log, env, report)
    binary = build_dir / "bin" / BINARY_NAME
    if not binary.is_file():
        raise _BuildFailed(f"the build finished without producing {binary}")
    return binary


def _tool_output(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)


def _inspect_binary(binary: Path) -> dict[str, Any]:
    """Run the binary once and list what it links against; refuse anything a host would lack."""
    version = _tool_output([str(binary), "--version"])
    version_text = (version.stdout + version.stderr).strip()
    if version.returncode != 0:
        raise _BuildFailed(f"{binary} --version exited with {version.returncode}: {version_text[-500:]}")
    ldd_text = _tool_output(["ldd", str(binary)]).stdout if shutil.which("ldd") else ""
    libraries: list[LinkedLibrary] = parse_ldd(ldd_text)
    unexpected = disallowed(libraries)
    if unexpected:
        raise _BuildFailed(f"{binary} links against {', '.join(unexpected)}; a host may not have them")
    objdump = _tool_output(["objdump", "-T", str(binary)]).stdout if shutil.which("objdump") else ""
    return {
        "version_output": version_text,
        "ldd": [line.strip() for line in ldd_text.strip().splitlines()],
        "shared_libraries": sorted(lib.soname for lib in libraries),
        "debian_packages": debian_packages(libraries),
        "glibc_required": glibc_required(objdump),
        "binary_sha256": sha256_of(binary),
        "binary_bytes": binary.stat().st_size,
    }


def _compiler_version() -> str:
    compiler = shutil.which("c++") or "c++"
    done = _tool_output([compiler, "--version"])
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def ensure_server(flavour: Flavour = "portable", *, jobs: int | None = None, sdist: Path | None = None,
                  progress: Progress | None = None) -> ServerBuild:
    """Return the cached build for ``flavour``, building it first when there is none.

    ``sdist`` takes a local copy of the llama-cpp-python sdist (checked by sha256) instead of pip.
    """
    say = progress or (lambda _message: None)
    jobs = jobs if jobs is not None else default_jobs()
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}", "pass a positive number of build jobs")
    version = pinned_version()
    final = install_dir(flavour, version)
    root = final.parent
    with _locked(root, final.name):
        cached = find_server(flavour)
        if cached is not None:
            say(f"llama-server {flavour} for llama-cpp-python {version} is already built: {cached.binary}")
            return cached
        _remove_leftovers(root, final.name)
        _require_tools()  # before a download that would be wasted
        return _build_into(final, version, flavour, jobs, sdist, say)


def _build_into(final: Path, version: str, flavour: Flavour, jobs: int, sdist: Path | None,
                say: Progress) -> ServerBuild:
    root = final.parent
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{final.name}.build-", dir=root))
    staged = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{final.name}.staging-", dir=root))
    log = work / "build.log"
    try:
        say(f"fetching llama-cpp-python {version} sdist" if sdist is None else f"using sdist {sdist}")
        source = fetch_source(version, work, sdist)
        flags = cmake_flags(flavour, source.commit)
        try:
            binary = _compile(source, flags, work / "build", jobs, log, say)
            facts = _inspect_binary(binary)
        except _BuildFailed as exc:
            kept = root / f"build-failure-{final.name}.log"
            write_atomic(kept, log.read_text(errors="replace") if log.exists() else str(exc))
            raise UserError(f"building llama-server failed: {exc}\n{_tail(log)}",
                            f"read the full log in {kept}; check that cmake and g++ work") from None
        (staged / "bin").mkdir()
        shutil.copy2(binary, staged / "bin" / BINARY_NAME)
        manifest: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "llama_cpp_python_version": version,
            "llama_cpp_commit": source.commit,
            "flavour": flavour,
            "source": f"https://pypi.org/project/llama-cpp-python/{version}/ (sdist)",
            "source_sha256": source.sdist_sha256,
            "cmake_flags": flags,
            "jobs": jobs,
            "compiler": _compiler_version(),
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **facts,
        }
        write_atomic(staged / "manifest.json", json.dumps(manifest, indent=2) + "\n", keep_previous=False)
        _replace_directory(staged, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)
    say(f"built {final / 'bin' / BINARY_NAME} in {manifest['build_seconds']:.0f} s")
    return ServerBuild(directory=final, manifest=manifest)
