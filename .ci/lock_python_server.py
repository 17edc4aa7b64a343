"""Write the hash-pinned requirements of the llama_server role's python mode (``make python-server-lock``).

The role installs llama-cpp-python's server with ``pip --require-hashes``, so every package, the build
backend included, is pinned to an exact version and to the sha256 of each file PyPI offers for it. Two files
under roles/llama_server/files/:

* ``python-server-build.txt``: the sdist's build backend (its ``[build-system] requires``), installed first,
  because ``--no-build-isolation`` is the only way pip checks the build backend's hashes too;
* ``python-server.txt``: ``llama-cpp-python[server]`` at the release the tuner pins
  (``tuner.server.source.PINNED_VERSION``) and everything it depends on.

The versions come from pip's own resolver (``pip install --dry-run --report``) run by this interpreter, so
the files hold for CPython 3.11 and later on Linux. Each version lists the sha256 of every file PyPI's JSON API
names for it, so the host's pip finds a hash for whichever wheel suits its platform; where the index does not
answer (a private mirror), only the file pip chose here is listed, and the file's header says which packages
are pinned to this platform's file alone. A host whose pip wants another file then stops with pip's own hash
error before installing anything, never installs an unchecked file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tuner.atomic import write_atomic  # noqa: E402
from tuner.server.source import DISTRIBUTION, download_sdist, pinned_version, verify_sdist  # noqa: E402

FILES = REPO / "roles" / "llama_server" / "files"
PYPI_JSON = "https://pypi.org/pypi/{name}/{version}/json"


Pin = tuple[str, str, str]  # name, version, sha256 of the file pip chose for this interpreter


def resolve(requirements: list[str]) -> list[Pin]:
    """Everything pip would install for ``requirements`` into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--disable-pip-version-check", "--report", str(report), *requirements], check=True)
        installs = json.loads(report.read_text())["install"]
    return sorted((item["metadata"]["name"], item["metadata"]["version"],
                   item["download_info"]["archive_info"]["hashes"]["sha256"]) for item in installs)


def pypi_hashes(name: str, version: str) -> set[str]:
    """The sha256 of every file of one release on PyPI; empty when the index does not know the release."""
    try:
        with urllib.request.urlopen(PYPI_JSON.format(name=name, version=version), timeout=60) as response:
            release = json.load(response)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return set()
        raise
    return {file["digests"]["sha256"] for file in release["urls"]}


def lock_text(pins: list[Pin], header: str, extras: dict[str, str]) -> str:
    lines = []
    alone = []
    for name, version, chosen in pins:
        hashes = pypi_hashes(name, version)
        if not hashes:
            alone.append(name)
        hashes.add(chosen)
        pinned = " ".join(f"--hash=sha256:{digest}" for digest in sorted(hashes))
        lines.append(f"{name}{extras.get(name, '')}=={version} {pinned}")
    if alone:
        note = "PyPI's JSON API did not know these releases; only the file pip chose here is pinned: "
        header += "\n" + textwrap.fill(note + ", ".join(alone), width=110)
    comments = [f"# {line}" for line in header.splitlines()]
    return "\n".join(comments + lines) + "\n"


def build_requires(version: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_sdist(version, Path(tmp))
        verify_sdist(sdist, version)
        with tarfile.open(sdist, "r:gz") as archive:
            member = archive.extractfile(f"llama_cpp_python-{version}/pyproject.toml")
            assert member is not None
            requires: list[str] = tomllib.load(member)["build-system"]["requires"]
    return requires


def main() -> None:
    version = pinned_version()
    python = f"CPython {sys.version_info.major}.{sys.version_info.minor}"
    made = f"Written by `make python-server-lock` (.ci/lock_python_server.py), resolved by pip on {python}."
    build = build_requires(version)
    backend = resolve(build)
    write_atomic(FILES / "python-server-build.txt", lock_text(
        backend, f"The build backend of {DISTRIBUTION} {version} ({', '.join(build)}).\n{made}", {}))
    server = resolve([f"{DISTRIBUTION}[server]=={version}"])
    write_atomic(FILES / "python-server.txt", lock_text(
        server, f"{DISTRIBUTION}[server] {version} and its dependencies.\n{made}", {"llama_cpp_python": "[server]"}))
    print(f"pinned {len(server)} packages and a build backend of {len(backend)} for {DISTRIBUTION} {version}")


if __name__ == "__main__":
    main()
