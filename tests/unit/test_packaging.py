"""The wheel ``pip wheel .`` builds from this tree: what a ``pipx install`` user gets.

Built from a copy of the files the build reads, so the test leaves no ``build/`` or ``*.egg-info`` in the
checkout."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "tuner", source / "tuner", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "out"),
                            str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("llamahost-*.whl")
    return wheel


def test_the_wheel_builds_and_carries_the_license_pyproject_names(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        licenses = [n for n in names if n.endswith("/licenses/LICENSE")]
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert licenses, f"no LICENSE in the wheel: {names[-8:]}"
        text = archive.read(licenses[0]).decode()
    spdx = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert spdx == "Apache-2.0" and "Apache License" in text and "Version 2.0, January 2004" in text
    assert f"License-Expression: {spdx}" in metadata
    assert "tuner/cli.py" in names and "tuner/commands/writeback.py" in names
    # A light install: llama-cpp-python (a llama.cpp compile) only with the binding extra, never by default.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: llama-cpp-python")]
    assert requires and all('extra == "binding"' in line for line in requires), requires


def test_the_tuner_never_loads_llama_cpp_in_process() -> None:
    """Trials run the llama-server build; a host that only serves, or a light install, has no llama-cpp-python."""
    importing = [str(path.relative_to(REPO)) for path in (REPO / "tuner").rglob("*.py")
                 if re.search(r"^\s*(import llama_cpp|from llama_cpp\b)", path.read_text(), re.MULTILINE)]
    assert importing == []


@pytest.mark.fetches
def test_the_wheel_installs_in_a_fresh_virtualenv_and_probes_without_llama_cpp_python(tmp_path: Path) -> None:
    """What `pipx install` of the wheel gives: the command works, and no llama.cpp was compiled for it."""
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], capture_output=True,
                               text=True, timeout=900, check=False)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probed = subprocess.run([str(venv / "bin" / "llamahost"), "probe", "--json", "--no-bandwidth"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert probed.returncode == 0, probed.stderr[-3000:]
    assert json.loads(probed.stdout)["topology"], "a working probe"
    binding = subprocess.run([str(venv / "bin" / "python"), "-c", "import llama_cpp"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert binding.returncode != 0 and "No module named 'llama_cpp'" in binding.stderr
