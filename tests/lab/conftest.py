"""Fixtures for the roles' tests: the QEMU lab host, an inventory for it, and a playbook runner.

How the lab is found or started (session scope): if a lab named ``default`` is running in the lab cache
(``LLAMAHOST_LAB_CACHE``, default ~/.cache/llamahost/lab, the same cache ``make lab-up`` uses) and
answers on SSH, the tests use it and leave it running; otherwise they boot one (building the image first
if the cache has none) and stop it at the end of the session.

A converge of the lab costs about ten minutes under TCG. The first one for a given set of inputs (roles,
playbooks, variables, image, binary: ``labkit.converged_disk_key``) is saved as a qcow2 disk in
``<lab cache>/converged/``; a later session with the same inputs boots from that disk and takes the recorded
site.yml run as its converge. Any change to the roles makes a new key, and the converge runs for real.

Each stage's wall time is recorded and printed at the end of the run (and kept in
``<lab cache>/last-test-timings.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from labkit import Lab, LabVars, converged_disks_dir, converged_record, wanted_lab_vars
from role_support import BIN, build_collection

from tuner.lab.image import lab_cache_dir
from tuner.lab.instance import LabInstance, LabState
from tuner.lab.spec import ImageRecipe, MachineSpec


@pytest.fixture(scope="session", autouse=True)
def shared_lab_cache() -> None:
    """Share the lab image across sessions (the suite's LLAMAHOST_HOME is thrown away every run)."""
    os.environ.setdefault("LLAMAHOST_LAB_CACHE", str(Path.home() / ".cache" / "llamahost" / "lab"))


@pytest.fixture(scope="session", autouse=True)
def built_collection(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The roles as users get them: ``ansible-galaxy collection build`` of this checkout, installed into a
    throw-away collections path that every playbook of the session uses (ANSIBLE_COLLECTIONS_PATH outranks
    ansible.cfg's link to the checkout). A file the build leaves out fails the lab, not a user."""
    root = tmp_path_factory.mktemp("collection")
    tarball = build_collection(root / "dist")
    installed = root / "collections"
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "--no-deps", "--force",
                    "-p", str(installed), str(tarball)], check=True, capture_output=True, text=True, timeout=300)
    before = os.environ.get("ANSIBLE_COLLECTIONS_PATH")
    os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(installed)
    try:
        yield installed / "ansible_collections" / "llamahost" / "host"
    finally:
        if before is None:
            os.environ.pop("ANSIBLE_COLLECTIONS_PATH", None)
        else:
            os.environ["ANSIBLE_COLLECTIONS_PATH"] = before


@pytest.fixture(scope="session")
def lab_vars(tiny_split_model_path: Path, llama_server_binary: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> LabVars:
    """The lab's wanted variables, the stack's among them, and the key of their converged disk
    (labkit.wanted_lab_vars)."""
    return wanted_lab_vars(tiny_split_model_path, llama_server_binary, tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
def lab_host(shared_lab_cache: None, lab_vars: LabVars
             ) -> Iterator[tuple[LabInstance, LabState, dict[str, float], bool, bool]]:
    """(instance, state, stage timings, started by this session, booted from a converged disk)."""
    instance = LabInstance(lab_cache_dir())
    timings: dict[str, float] = {}
    state = instance.running()
    reused = state is not None and instance.reachable(state)
    disk = converged_disks_dir() / f"{lab_vars.key}.qcow2"
    from_disk = not reused and converged_record(lab_vars.key) is not None
    if not reused:
        started = time.monotonic()
        state = instance.up(ImageRecipe(), MachineSpec(), progress=lambda message: print(f"lab: {message}"),
                            disk=disk if from_disk else None)
        timings["image build (0 when cached)"] = state.image_build_s
        timings["boot to SSH" + (" (from the converged disk)" if from_disk else "")] = \
            state.boot_s or round(time.monotonic() - started, 1)
    assert state is not None
    try:
        yield instance, state, timings, not reused, from_disk
    finally:
        _write_timings(timings, reused)
        if not reused:
            instance.down()


@pytest.fixture(scope="session")
def lab(lab_host: tuple[LabInstance, LabState, dict[str, float], bool, bool],
        lab_vars: LabVars, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The lab as a host of a Pulumi stack, with an inventory like its user's: hosts.yml written from the stack
    (labkit.stack_host_vars), group_vars, and host_vars written from a RunConfig. The stack's first boot (its
    user data: the data volume formatted and mounted) has run before Ansible connects, as cloud-init runs it.
    It serves the tiny generated model: under TCG every byte copied, hashed and locked costs, and a request to
    the 135M model takes minutes."""
    instance, state, timings, started_here, from_disk = lab_host
    inventory = tmp_path_factory.mktemp("lab-inventory")
    (inventory / "group_vars").mkdir()
    (inventory / "group_vars" / "llama_hosts.yml").write_text(yaml.safe_dump(lab_vars.group_vars))
    (inventory / "host_vars").mkdir()
    (inventory / "host_vars" / f"{state.alias}.yml").write_text(yaml.safe_dump(lab_vars.host_vars))
    lab = Lab(instance, state, inventory, timings, disk_key=lab_vars.key, started_here=started_here,
              from_converged_disk=from_disk, lab_vars=lab_vars)
    lab.write_hosts()
    started = time.monotonic()
    lab.ssh("sudo sh -s", stdin=lab_vars.first_boot_script())  # idempotent: a formatted volume is kept
    timings["the stack's first boot (data volume)"] = round(time.monotonic() - started, 1)
    if from_disk:
        lab.wait_until_serving()
    return lab


_REPORT: dict[str, Any] = {}


def _write_timings(timings: dict[str, float], reused: bool) -> None:
    if not timings:
        return
    _REPORT.update({"reused_running_lab": reused, "stages_s": dict(timings)})
    (lab_cache_dir() / "last-test-timings.json").write_text(json.dumps(_REPORT, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the lab's stage timings at the end of the run (the CI log is where people look)."""
    if _REPORT:
        terminalreporter.section("lab stage timings")
        for name, seconds in _REPORT["stages_s"].items():
            terminalreporter.write_line(f"{name:<40} {seconds:7.1f} s")
        if _REPORT["reused_running_lab"]:
            terminalreporter.write_line("(a running lab was reused: no image build or boot in this run)")
