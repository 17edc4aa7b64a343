"""The llamahost_tuner role on this machine (a real converge into a scratch prefix, as root): llamahost from a
wheelhouse built here, with no index; idempotent and check-mode clean; a host the wheelhouse cannot serve and a
wheel whose hash differs are refused, and the release that worked stays current.

The lab test (tests/lab/test_live_systemd.py) installs the same role on the QEMU host through playbooks/tune.yml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from role_support import BIN, REPO, run_playbook

from tuner.wheelhouse import write_archive

pytestmark = [pytest.mark.fetches,
              pytest.mark.skipif(os.geteuid() != 0, reason="the role installs as root (owner: root)")]

ROLE = REPO / "roles" / "llamahost_tuner"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("wheelhouse") / "wheels"
    done = subprocess.run([str(BIN / "llamahost"), "wheelhouse", str(dest), "--json"], capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads(done.stdout)
    assert manifest == json.loads((dest / "wheelhouse.json").read_text())
    assert manifest["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert not any(name.startswith(("llama_cpp_python", "llama-cpp-python")) for name in manifest["wheels"])
    return dest


def install(wheels: Path, root: Path, *, check: bool = False) -> tuple[int, list[str], str]:
    """Converge the role into ``root``: exit status, the names of the tasks that changed, the output's tail."""
    play = {"hosts": "localhost", "gather_facts": False,
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                     "llamahost_tuner_wheelhouse": str(wheels), "llamahost_tuner_prefix": str(root / "opt"),
                     "llamahost_tuner_stage_dir": str(root / "stage"),
                     "llamahost_tuner_command_link": str(root / "bin" / "llamahost")},
            "tasks": [{"ansible.builtin.file": {"path": str(root / "bin"), "state": "directory", "mode": "0755"}},
                      {"ansible.builtin.include_role": {"name": str(ROLE)}}]}
    if check:
        play["check_mode"] = True
    rc, report, output = run_playbook([play])
    changed = [task["task"]["name"] for play_report in report.get("plays", []) for task in play_report["tasks"]
               if task["hosts"].get("localhost", {}).get("changed")]
    return rc, changed, output


def test_the_role_installs_llamahost_from_the_wheelhouse_and_a_second_converge_changes_nothing(
        wheelhouse: Path, tmp_path: Path) -> None:
    rc, changed, output = install(wheelhouse, tmp_path)
    assert rc == 0, output
    assert any(" : Install the wheelhouse" in name for name in changed), changed
    command = tmp_path / "bin" / "llamahost"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60, check=True)
    manifest = json.loads((wheelhouse / "wheelhouse.json").read_text())
    assert version.stdout.strip() == f"llamahost {manifest['llamahost']}"
    release = (tmp_path / "opt" / "current").resolve()
    assert release.parent == tmp_path / "opt" / "releases"
    installed = subprocess.run([str(release / "bin" / "python"), "-c", "import llama_cpp"], capture_output=True,
                               check=False)
    assert installed.returncode != 0, "llama-cpp-python is not installed on the host: trials run the deployed build"
    for check in (True, False):
        rc, changed, output = install(wheelhouse, tmp_path, check=check)
        assert (rc, changed) == (0, []), output


def test_a_host_the_wheelhouse_cannot_serve_is_refused_before_anything_is_copied(
        wheelhouse: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(wheelhouse, other)
    manifest: dict[str, Any] = json.loads((other / "wheelhouse.json").read_text())
    (other / "wheelhouse.json").write_text(json.dumps({**manifest, "python": "3.99"}))
    root = tmp_path / "root"
    rc, _, output = install(other, root)
    assert rc != 0
    assert "serves CPython 3.99" in output and "llamahost wheelhouse DIR --python-version" in output, output
    assert not (root / "stage").exists() and not (root / "opt").exists()


def test_the_archive_the_role_copies_holds_exactly_the_wheelhouse(wheelhouse: Path) -> None:
    with tarfile.open(wheelhouse / "wheelhouse.tar") as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}  # type: ignore[union-attr]
    files = {path.name: path.read_bytes() for path in wheelhouse.iterdir() if path.name != "wheelhouse.tar"}
    assert members == files


def test_a_wheel_whose_hash_differs_is_refused_and_the_working_release_stays_current(
        wheelhouse: Path, tmp_path: Path) -> None:
    rc, _, output = install(wheelhouse, tmp_path)
    assert rc == 0, output
    working = (tmp_path / "opt" / "current").resolve()
    tampered = tmp_path / "tampered"
    shutil.copytree(wheelhouse, tampered)
    wheel = next(tampered.glob("shtab-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"\0")  # same name, other bytes
    requirements = tampered / "requirements.txt"  # a new release (another pin elsewhere), with the old hash for it
    requirements.write_text(requirements.read_text() + "# another wheelhouse\n")
    write_archive(tampered)
    rc, _, output = install(tampered, tmp_path)
    assert rc != 0
    assert "hash" in output.lower(), output
    assert (tmp_path / "opt" / "current").resolve() == working, "the release that worked is still the current one"
    assert subprocess.run([str(tmp_path / "bin" / "llamahost"), "--version"], capture_output=True, timeout=60,
                          check=False).returncode == 0
