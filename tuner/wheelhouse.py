"""A wheelhouse: llamahost and its pinned dependencies as wheels, built once on the controller for the hosts.

The ``llamahost_tuner`` role installs the tuner on a llama host from it, with ``pip install --no-index
--require-hashes``: the host needs no compiler, no index and no internet (an air-gapped on-prem box gets it the
same way), and what runs there is exactly what was built here. llama-cpp-python is not in it: trials run the
deployed llama.cpp build (the ``binding`` extra stays on the controller).

The directory holds the wheels, ``requirements.txt`` (every wheel pinned by version and sha256) and
``wheelhouse.json``, the manifest the role checks a host against before it copies anything: the CPython version
the binary wheels were built for, the machine architecture and the oldest glibc that every wheel accepts; and
``wheelhouse.tar``, all of them in one file, which is what the role copies to a host.
Pure parsing here; :func:`build_wheelhouse` runs pip.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from tuner import __version__
from tuner.atomic import previous_path
from tuner.errors import UserError

MANIFEST_NAME = "wheelhouse.json"
REQUIREMENTS_NAME = "requirements.txt"
# Everything above in one file: the role copies this (one transfer, where each file costs a round trip over SSM).
ARCHIVE_NAME = "wheelhouse.tar"
PROJECT = "llamahost"
# Extras that the host side may need: the fleet's PostgreSQL driver (`fleet work` on the hosts).
HOST_EXTRAS = ("fleet",)
PIP_TIMEOUT_S = 1800

# Legacy manylinux names -> the glibc they stand for (PEP 600).
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")


@dataclass(frozen=True)
class WheelNeeds:
    """What one wheel asks of the host: nothing (pure Python), or a CPython version, an architecture and glibc."""

    python: str | None  # "3.11" for a cp311 wheel, None for py3 / abi3 wheels
    arch: str | None
    glibc: tuple[int, int] | None  # the oldest glibc any of its platform tags accepts


def wheel_needs(filename: str) -> WheelNeeds:
    """What the wheel ``filename`` needs of a host, from its tags; a UserError for a wheel no Linux host can use."""
    _, _, _, tags = parse_wheel_filename(filename)
    pythons = {t.interpreter for t in tags if t.interpreter.startswith("cp") and t.abi not in ("abi3", "none")}
    arches: set[str] = set()
    glibcs: list[tuple[int, int]] = []
    for tag in tags:
        if tag.platform == "any":
            continue
        legacy = next((v for k, v in _LEGACY_MANYLINUX.items() if tag.platform.startswith(k + "_")), None)
        match = _MANYLINUX.match(tag.platform)
        if legacy is not None:
            glibcs.append(legacy)
            arches.add(tag.platform.split("_", 1)[1])
        elif match:
            glibcs.append((int(match.group(1)), int(match.group(2))))
            arches.add(match.group(3))
        else:
            raise UserError(f"the wheel {filename} is for {tag.platform}, which a manylinux host cannot install",
                            "build the wheelhouse with pip's manylinux wheels (no locally built linux_* wheels)")
    if len(arches) > 1 or len(pythons) > 1:
        raise UserError(f"the wheel {filename} names several architectures or Pythons", "rebuild the wheelhouse")
    python = next(iter(pythons), None)
    return WheelNeeds(python=f"{python[2]}.{python[3:]}" if python else None, arch=next(iter(arches), None),
                      glibc=min(glibcs) if glibcs else None)


@dataclass(frozen=True)
class Manifest:
    """What a wheelhouse serves: the role's compatibility check reads these fields."""

    llamahost: str
    python: str | None
    arch: str | None
    glibc: str | None  # "2.28": every wheel installs on this glibc or newer
    wheels: dict[str, str]  # file name -> sha256

    def to_dict(self) -> dict[str, object]:
        return {"llamahost": self.llamahost, "python": self.python, "arch": self.arch, "glibc": self.glibc,
                "wheels": dict(sorted(self.wheels.items()))}


def manifest_of(wheels: dict[str, str]) -> Manifest:
    """The manifest of wheels (file name -> sha256): one Python and one architecture, the newest glibc asked."""
    needs = {name: wheel_needs(name) for name in wheels}
    pythons = {n.python for n in needs.values() if n.python}
    arches = {n.arch for n in needs.values() if n.arch}
    if len(pythons) > 1 or len(arches) > 1:
        raise UserError(f"the wheelhouse mixes Pythons {sorted(pythons)} or architectures {sorted(arches)}",
                        "build it for one target: --python-version X.Y and one --arch")
    glibcs = [n.glibc for n in needs.values() if n.glibc]
    projects = {canonicalize_name(parse_wheel_filename(name)[0]): name for name in wheels}
    if canonicalize_name(PROJECT) not in projects:
        raise UserError("the wheelhouse has no llamahost wheel", "build it with `llamahost wheelhouse DIR`")
    version = str(parse_wheel_filename(projects[canonicalize_name(PROJECT)])[1])
    newest = max(glibcs) if glibcs else None
    return Manifest(llamahost=version, python=next(iter(pythons), None), arch=next(iter(arches), None),
                    glibc=f"{newest[0]}.{newest[1]}" if newest else None, wheels=dict(wheels))


def requirement_lines(wheels: dict[str, str]) -> str:
    """``requirements.txt`` for ``pip install --no-index --require-hashes``: each wheel by version and sha256."""
    lines = []
    for name, digest in sorted(wheels.items()):
        project, version, _, _ = parse_wheel_filename(name)
        lines.append(f"{project}=={version} --hash=sha256:{digest}")
    return "\n".join(lines) + "\n"


def platform_tags(arch: str, glibc: str) -> list[str]:
    """pip's ``--platform`` values for a host with this architecture and glibc: every manylinux it can install."""
    major, minor = (int(part) for part in glibc.split("."))
    if major != 2 or minor < 17:
        raise UserError(f"glibc {glibc} is older than manylinux2014 (2.17)", "give the host's glibc, e.g. 2.36")
    return [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]


def installed_constraints(requirements: Iterable[str]) -> list[str]:
    """``name==version`` of each distribution this environment has installed in the closure of ``requirements``:
    the hosts get the versions the controller runs and tests, not whatever the index has newest."""
    pins: dict[str, str] = {}
    pending = list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        name = canonicalize_name(requirement.name)
        if name in pins or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: pip resolves it within the requirement
        pending.extend(metadata.requires(name) or [])
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def host_requirements(extras: Sequence[str]) -> list[str]:
    """llamahost's runtime requirements and those of ``extras``, from its installed metadata."""
    out = []
    for line in metadata.requires(PROJECT) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
            requirement.marker = None
            out.append(str(requirement))
    return out


def write_archive(directory: Path) -> Path:
    """``wheelhouse.tar`` in ``directory``: its wheels, requirements and manifest, flat (wheels are compressed
    already), written beside and renamed into place."""
    archive = directory / ARCHIVE_NAME
    scratch = directory / f".{ARCHIVE_NAME}.tmp"
    with tarfile.open(scratch, "w") as tar:
        for path in sorted(directory.iterdir()):
            if path.suffix == ".whl" or path.name in (REQUIREMENTS_NAME, MANIFEST_NAME):
                tar.add(path, arcname=path.name)
    scratch.replace(archive)
    return archive


def _pip(args: Sequence[str], *, what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"pip timed out {what}", "check the controller's index (pip config list)") from None
    if done.returncode != 0:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise UserError(f"pip failed {what}: {tail}",
                        "check the controller's index (pip config list); for another target, pass the "
                        "--python-version and --glibc its wheels need")


def _project_source() -> Path | None:
    """This checkout's root when llamahost runs from one (its wheel is built from it); None when installed."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and f'name = "{PROJECT}"' in pyproject.read_text() else None


def build_wheelhouse(dest: Path, *, python_version: str | None, arch: str | None, glibc: str | None,
                     extras: Sequence[str] = HOST_EXTRAS) -> Manifest:
    """Build the wheelhouse in a temporary directory beside ``dest``, then swap it in (the previous kept as
    ``dest.prev``): a failed build leaves ``dest`` as it was."""
    target: list[str] = []
    if python_version or arch or glibc:
        if not (python_version and arch and glibc):
            raise UserError("a wheelhouse for another target needs all of --python-version, --arch and --glibc",
                            "pass e.g. --python-version 3.12 --arch x86_64 --glibc 2.39 (a host's python3 --version, "
                            "uname -m and getconf GNU_LIBC_VERSION)")
        target = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
        for tag in platform_tags(arch, glibc):
            target += ["--platform", tag]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as scratch:
        work = Path(scratch) / "wheels"
        source = _project_source()
        if source is not None:
            _pip(["wheel", "--no-deps", "-w", str(work), str(source)],
                 what=f"building the llamahost wheel from {source}")
        else:
            _pip(["download", "--no-deps", "-d", str(work), f"{PROJECT}=={__version__}"],
                 what=f"downloading llamahost {__version__}")
        constraints = Path(scratch) / "constraints.txt"
        requirements = host_requirements(extras)
        constraints.write_text("\n".join(installed_constraints(requirements)) + "\n")
        _pip(["download", "--only-binary=:all:", "-d", str(work), "-c", str(constraints), *target,
              *requirements, "pip"], what="downloading llamahost's dependencies as wheels")
        wheels = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(work.glob("*.whl"))}
        manifest = manifest_of(wheels)
        (work / REQUIREMENTS_NAME).write_text(requirement_lines(wheels))
        (work / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        write_archive(work)
        previous = previous_path(dest)
        if dest.exists():
            shutil.rmtree(previous, ignore_errors=True)
            dest.rename(previous)
        work.rename(dest)
    return manifest
